"""A run directory: its layout, its lifecycle, and the one reader (and writer) of each artifact in it.

    runs/<run.name>/
      config.yaml                 the resolved configuration
      manifest.json               what ran, on what, with which data; the results
      metrics.jsonl               every train and eval log, one JSON line with its step
      tensorboard/                event files
      loss.png                    train and eval loss
      base-model/                 the random-weight base (model.name=random:*)
      checkpoints/checkpoint-N/   Trainer checkpoints, complete once kit-complete is written into them
      adapter/                    the PEFT adapter + tokenizer with Llama 3.1's chat template
      export/merged16/            kit export --to merged16
      export/gguf-<quant>/        kit export --to gguf (+ Ollama Modelfile)
      serve.log, serve-merged.log vLLM's log when kit serve runs it
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import yaml

from kit import env
from kit.errors import AdapterError, ConfigError
from kit.io import atomic_dir, atomic_write_text, move_aside
from kit.llama import PROJECTIONS, projection_shapes

if TYPE_CHECKING:
    from kit.config import Config

log = logging.getLogger("kit")
CONFIG, MANIFEST, METRICS = "config.yaml", "manifest.json", "metrics.jsonl"
TENSORBOARD, LOSS_PNG = "tensorboard", "loss.png"
BASE_MODEL, CHECKPOINTS, ADAPTER, EXPORT, MERGED16 = "base-model", "checkpoints", "adapter", "export", "merged16"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
TRAINER_STATE = "trainer_state.json"
COMPLETE = "kit-complete"  # written last into a checkpoint: without it the checkpoint is incomplete
# Unsloth's pre-quantized repos; LoRA applies to the 16-bit model they were made from
BNB_4BIT_SUFFIXES = ("-unsloth-bnb-4bit", "-bnb-4bit")


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def manifest(self) -> Path:
        return self.path / MANIFEST

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def loss_png(self) -> Path:
        return self.path / LOSS_PNG

    @property
    def base_model(self) -> Path:
        return self.path / BASE_MODEL

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER

    @property
    def merged16(self) -> Path:
        return self.path / EXPORT / MERGED16

    def gguf(self, quant: str) -> Path:
        return self.path / EXPORT / f"gguf-{quant}"

    def gguf_files(self) -> list[Path]:
        return sorted((self.path / EXPORT).glob("gguf-*/*.gguf"))

    @property
    def serve_log(self) -> Path:
        return self.path / "serve.log"

    @property
    def serve_merged_log(self) -> Path:
        """Beside the export, never inside it: the export folder is copied and uploaded as a model."""
        return self.path / "serve-merged.log"

    def trained_length(self) -> Optional[int]:
        """The run's model.max_seq_length from its config.yaml (None for a bare adapter folder)."""
        if not self.config.is_file():
            return None
        return (yaml.safe_load(self.config.read_text()) or {}).get("model", {}).get("max_seq_length")


# ---------------------------------------------------------------- lifecycle

def start(cfg: Config) -> Optional[Path]:
    """Create the run directory, never clobbering an earlier run; on resume, return the checkpoint and
    forget the metrics logged after it (those steps are trained again)."""
    run, resume = RunDir(cfg.run_dir), cfg.train.resume_from_checkpoint
    if resume is None:
        if run.path.exists() and any(run.path.iterdir()):
            if not cfg.run.overwrite:
                raise ConfigError(f"run directory {run.path} already exists. Resume it with "
                                  "train.resume_from_checkpoint=auto, choose another run.name=..., or pass "
                                  "run.overwrite=true (the old run is moved aside, not deleted).")
            log.warning(f"run.overwrite: moved the previous run to {move_aside(run.path)}")
        run.path.mkdir(parents=True, exist_ok=True)
        return None
    if resume == "auto":
        found = complete_checkpoints(run.checkpoints) if run.path.exists() else []
        if not found:
            raise ConfigError(f"train.resume_from_checkpoint=auto: {run.checkpoints} holds no complete "
                              "checkpoint to resume from. Start a new run without resume_from_checkpoint.")
        checkpoint = found[-1]
    else:
        checkpoint = Path(resume)
        if not (checkpoint / TRAINER_STATE).is_file():
            raise ConfigError(f"train.resume_from_checkpoint={resume}: not a checkpoint folder (no {TRAINER_STATE}).")
    trim_metrics(run.metrics, checkpoint_step(checkpoint))
    log.info(f"resuming from {checkpoint} (step {checkpoint_step(checkpoint)})")
    return checkpoint


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def trim_metrics(path: Path, upto_step: int) -> None:
    if path.exists():
        keep = [m for m in read_metrics(path) if m["step"] <= upto_step]
        atomic_write_text(path, "".join(json.dumps(m) + "\n" for m in keep))


# ---------------------------------------------------------------- checkpoints

def checkpoint_name(step: int) -> str:
    """The Trainer's name for the checkpoint of `step`."""
    return f"checkpoint-{step}"


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first; incomplete ones (a crash mid-save) are renamed aside."""
    found = []
    for d in Path(folder).glob(checkpoint_name("*")):
        if not d.name.split("-")[-1].isdigit():
            continue
        if (d / COMPLETE).exists():
            found.append(d)
        else:
            aside = d.parent / f".incomplete-{d.name}"
            log.warning(f"{d} was not completely written (interrupted save); moved to {aside.name}.")
            os.replace(d, aside)
    return sorted(found, key=checkpoint_step)


def tokens_seen(checkpoint: Optional[Path]) -> int:
    """Tokens a checkpoint had trained (0 for a fresh start)."""
    if checkpoint is None:
        return 0
    return json.loads((checkpoint / TRAINER_STATE).read_text()).get("num_input_tokens_seen", 0)


# ---------------------------------------------------------------- the adapter

def sixteen_bit(base: str) -> str:
    for suffix in BNB_4BIT_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


@dataclass(frozen=True)
class Adapter:
    path: Path
    """The folder holding adapter_config.json and adapter_model.safetensors."""
    config: dict
    """adapter_config.json."""
    shapes: dict[str, tuple[int, ...]]
    """Tensor name -> shape, from the safetensors header."""

    @property
    def named_base(self) -> str:
        return self.config["base_model_name_or_path"]

    @property
    def base(self) -> str:
        """The 16-bit model the adapter applies to: a QLoRA adapter is merged into (and served on) the
        original weights, never a de-quantized 4-bit copy."""
        return sixteen_bit(self.named_base)

    @property
    def note(self) -> Optional[str]:
        if self.base == self.named_base:
            return None
        return (f"the adapter names the 4-bit repo {self.named_base}; using the 16-bit base {self.base} "
                "(LoRA applies to unquantized weights; the 4-bit copy would only lose quality)")

    @property
    def rank(self) -> int:
        return max([self.config["r"], *self.config.get("rank_pattern", {}).values()])

    def check_fits(self, base_config: dict, base: str) -> None:
        """The LoRA matrices must fit the base: hidden size, layers, projection widths."""
        hidden, layers = base_config["hidden_size"], base_config["num_hidden_layers"]
        widths = projection_shapes(base_config)
        for key, shape in self.shapes.items():
            parts = key.split(".")
            module = next((p for p in parts if p in PROJECTIONS), None)
            if "layers" not in parts or module is None or not {"lora_A", "lora_B"} & set(parts):
                continue
            layer = int(parts[parts.index("layers") + 1])
            fan_in, fan_out = widths[module]
            expected = (shape[0], fan_in) if "lora_A" in parts else (fan_out, shape[1])
            if layer >= layers or shape != expected:
                raise AdapterError(
                    f"{self.path}: {key} has shape {shape}, but the base {base} ({layers} layers, hidden {hidden}) "
                    f"needs {expected if layer < layers else 'fewer layers'}. This adapter was trained for a "
                    "different model, of another shape: use it with the base it was trained on.")


def read_adapter(path: Path) -> Adapter:
    """The adapter of a run directory (RUN/adapter) or a bare adapter folder; AdapterError when it is
    missing or damaged."""
    path = Path(path)
    folder = path / ADAPTER if (path / ADAPTER).is_dir() else path
    cfg_file, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not cfg_file.is_file():
        raise AdapterError(f"{path}: no adapter ({ADAPTER}/{ADAPTER_CONFIG}). Train the run first "
                           "(python -m kit.recipes.llama31_sft) or check the path; to serve a merged export "
                           "instead, pass kit serve --merged.")
    if not weights.is_file():
        raise AdapterError(f"{folder}: {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; the run's save was interrupted. "
                           "Resume the run (train.resume_from_checkpoint=auto) to write it again.")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_file}: not valid JSON ({e}); the adapter is damaged, re-save it from a "
                           "checkpoint.") from None
    return Adapter(folder, config, _tensor_shapes(weights))


def _tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes from a safetensors header, without loading the weights."""
    size = weights.stat().st_size
    try:
        with open(weights, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            tensors = {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}
        end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
        if 8 + n + end > size:
            raise ValueError(f"{size} bytes, but the header describes {8 + n + end}")
        return {k: tuple(v["shape"]) for k, v in tensors.items()}
    except (ValueError, KeyError, TypeError) as e:
        raise AdapterError(f"{weights} cannot be read ({e}); the file is corrupt. Re-save the adapter from a "
                           "checkpoint.") from None


def base_config(base: str) -> dict:
    """config.json of a base model: a local folder, or from the Hub (cached)."""
    if Path(base).is_dir():
        return json.loads((Path(base) / "config.json").read_text())
    from huggingface_hub import hf_hub_download
    try:
        return json.loads(Path(hf_hub_download(base, "config.json", token=env.hf_token())).read_text())
    except Exception as e:
        raise AdapterError(f"cannot read the base model's config for {base} ({type(e).__name__}); with no network, "
                           "use a local copy of the model (kit serve --base PATH).") from None


def save_adapter(model, tokenizer, folder: Path, base: str) -> Path:
    """The trained PEFT adapter and the tokenizer, written atomically, naming `base` as the base model
    (Unsloth may record its own -bnb-4bit repo name there)."""
    with atomic_dir(folder, replace=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        cfg_file = tmp / ADAPTER_CONFIG
        data = json.loads(cfg_file.read_text())
        data["base_model_name_or_path"] = base
        cfg_file.write_text(json.dumps(data, indent=2))
    return folder
