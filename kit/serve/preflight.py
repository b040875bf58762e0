"""kit serve's preflight: what vLLM would refuse, or silently get wrong, checked before it starts. The
result is a ServeSpec: what to serve, and how (kit.serve.launcher starts it)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from kit.core import env
from kit.core.errors import PreflightError
from kit.models.hub import base_config
from kit.models.llama import PROJECTIONS
from kit.models.template import ChatFormat, chat_format
from kit.run.rundir import Adapter, RunDir, read_adapter

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values
# Adapters vLLM keeps in CPU memory beyond the served ones when adapters can be loaded at run time: its LRU
# cache holds --max-cpu-loras adapters and evicts the least recently used (re-read from disk on next use).
RUNTIME_ADAPTER_ROOM = 8


@dataclass(frozen=True)
class ServedAdapter:
    name: str
    """The model name clients ask for."""
    adapter: Adapter
    max_seq_length: Optional[int]
    """The run's model.max_seq_length (None for a bare adapter folder)."""


@dataclass
class ServeSpec:
    base: str
    tokenizer: str
    adapters: list[ServedAdapter] = field(default_factory=list)
    max_lora_rank: Optional[int] = None
    max_loras: Optional[int] = None
    """Adapters in one batch (vLLM's GPU slots)."""
    max_cpu_loras: Optional[int] = None
    """Adapters vLLM keeps loaded in CPU memory."""
    runtime_adapters: bool = False
    """Adapters may be loaded and unloaded while the server runs (kit adapters load/unload)."""
    fp8: bool = False
    """vLLM quantizes the 16-bit weights to FP8 as it loads them (dynamic FP8)."""
    kv_cache_dtype: Optional[str] = None
    tensor_parallel_size: int = 1
    """GPUs that vLLM shards the model over (its tensor parallelism)."""
    gpu_memory_utilization: Optional[float] = None
    """The share of each GPU's memory vLLM may take (weights and KV cache); None: vLLM's default, 0.9."""
    max_model_len: Optional[int] = None
    generation_config: Optional[dict] = None
    """What vLLM gets as the model's generation_config.json instead of the served model's own (None: its own,
    --generation-config auto): its own, with the stop tokens of the run's chat format that it lacks (a base trained
    in another format; a merged export has its run's, kit export writes them)."""
    notes: list[str] = field(default_factory=list)
    log: Optional[Path] = None
    """Where vLLM's log goes: the run directory."""


def check_servable(adapter: Adapter, run_dir: Path) -> None:
    """vLLM applies plain LoRA to the Llama projections; anything else would be refused or ignored."""
    c = adapter.config
    problems = []
    if c.get("use_dora"):
        problems.append("it is a DoRA adapter, which vLLM cannot apply")
    if c.get("bias", "none") != "none" or c.get("lora_bias"):
        problems.append(f"it trains biases (bias={c.get('bias')}), which vLLM ignores: answers would differ")
    if c.get("modules_to_save"):
        problems.append(f"it carries fully trained modules {c['modules_to_save']}, which vLLM does not load")
    targets = c.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    if bad := sorted(set(targets) - set(PROJECTIONS)):
        problems.append(f"it targets {bad}, which vLLM's LoRA does not support (it applies adapters to the 7 "
                        "attention and MLP projections)")
    if problems:
        raise PreflightError(f"{adapter.path}: " + "; ".join(problems) + ". Serve the merged model instead: "
                             f"kit export {run_dir} --to merged16, then kit serve {run_dir} --merged.")


def check(run_dirs: list[Path], merged: bool = False, base: Optional[str] = None,
          max_model_len: Optional[int] = None, names: Optional[list[str]] = None, *, adapter_form: bool = False,
          runtime_adapters: bool = False, fp8: bool = False, kv_cache_dtype: Optional[str] = None,
          max_lora_rank: Optional[int] = None, max_loras: Optional[int] = None,
          max_cpu_loras: Optional[int] = None) -> ServeSpec:
    """The ServeSpec for `kit serve RUN_DIR ...`; PreflightError (or AdapterError) says what is wrong.
    `adapter_form`: base + adapter was asked for explicitly (no note that merged is faster)."""
    runs = [RunDir(Path(d)) for d in run_dirs]
    if merged:
        if runtime_adapters or adapter_form:
            raise PreflightError("--merged serves a merged export, which takes no adapters; --adapter and "
                                 "--allow-runtime-adapters serve the base model with adapters: choose one.")
        if len(runs) != 1:
            raise PreflightError("--merged serves one run's merged export; give one run directory.")
        folder = runs[0].merged16
        if not (folder / "config.json").is_file():
            raise PreflightError(f"{folder}: no merged export; write it with: kit export {runs[0].path} --to merged16")
        stopping = stopping_config(str(folder), base_config(str(folder)), folder_chat_format(folder))
        return ServeSpec(base=str(folder), tokenizer=str(folder), fp8=fp8, kv_cache_dtype=kv_cache_dtype,
                         max_model_len=max_model_len or runs[0].trained_length(), generation_config=stopping,
                         log=runs[0].serve_merged_log)
    adapters = []
    for i, run in enumerate(runs):
        adapter = read_adapter(run.path)
        check_servable(adapter, run.path)
        name = names[i] if names and i < len(names) else run.name
        adapters.append(ServedAdapter(name, adapter, run.trained_length()))
    if len({a.name for a in adapters}) < len(adapters):
        raise PreflightError("two runs have the same name; name them: --name a --name b.")
    bases = {a.adapter.base for a in adapters}
    if len(bases) > 1 and base is None:
        raise PreflightError(f"the adapters were trained on different bases {sorted(bases)}; one server serves "
                             "one base: start one server per base.")
    served = base or bases.pop()
    notes = list(dict.fromkeys(a.adapter.note for a in adapters if a.adapter.note))
    fmt = served_chat_format(adapters)
    cfg = base_config(served)
    for a in adapters:
        a.adapter.check_fits(cfg, served)
    rank = lora_rank(max(a.adapter.rank for a in adapters), max_lora_rank)
    slots = max_loras or len(adapters)
    cached = max_cpu_loras or slots + (RUNTIME_ADAPTER_ROOM if runtime_adapters else 0)
    if cached < slots:  # vLLM's LoRAConfig refuses it, after loading the model
        raise PreflightError(f"--max-cpu-loras {cached} is below --max-loras {slots}: vLLM keeps every adapter of a "
                             f"batch in CPU memory too; pass --max-cpu-loras {slots} or more.")
    trained_len = max((a.max_seq_length or 0) for a in adapters) or None
    limit = cfg.get("max_position_embeddings")
    if max_model_len and limit and max_model_len > limit:
        raise PreflightError(f"--max-model-len {max_model_len} exceeds the base's max_position_embeddings {limit}.")
    length = max_model_len or trained_len
    if length and limit and length > limit:  # a Llama 3.x base trained past its positions (kit.models.llama)
        notes.append(f"the runs trained on up to {length:,} tokens, past the base's {limit:,} positions "
                     f"(max_position_embeddings), which vLLM serves: --max-model-len {limit}.")
        length = limit
    if max_model_len and trained_len and max_model_len < trained_len:
        notes.append(f"--max-model-len {max_model_len} is below the runs' max_seq_length {trained_len}: prompts as "
                     "long as the training examples will be refused.")
    if len(runs) == 1 and not (adapter_form or runtime_adapters):
        notes.append(f"one fine-tune is served as base + adapter; merged is faster (the adapter decoded at 0.90-0.93x "
                     "of merged at 1 request and 0.87-0.88x at 32 on an H200, docs/benchmarks.md): kit export "
                     f"{runs[0].path} --to merged16, then kit serve {runs[0].path} --merged. --adapter keeps this form "
                     "without this note.")
    if fp8:
        notes.append("--fp8: the adapters were trained on the 16-bit weights, which vLLM now quantizes to FP8; "
                     "compare the answers with: kit verify RUN --url URL --model NAME.")
    return ServeSpec(base=served, tokenizer=str(adapters[0].adapter.path), adapters=adapters, max_lora_rank=rank,
                     max_loras=slots, max_cpu_loras=cached, runtime_adapters=runtime_adapters, fp8=fp8,
                     kv_cache_dtype=kv_cache_dtype, max_model_len=length,
                     generation_config=stopping_config(served, cfg, fmt), notes=notes, log=runs[0].serve_log)


class SavedTokenizer:
    """What kit.models.template.chat_format reads of a tokenizer (its chat template, eos token and the ids of its
    special tokens), read from the files a tokenizer was saved to: the preflight answers in a second, without importing
    transformers."""

    def __init__(self, folder: Path):
        config = _json(folder / "tokenizer_config.json") or {}
        jinja = folder / "chat_template.jinja"
        template = jinja.read_text(encoding="utf-8") if jinja.is_file() else config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        self.chat_template: Optional[str] = template
        eos = config.get("eos_token")
        self.eos_token: Optional[str] = eos.get("content") if isinstance(eos, dict) else eos
        data = _json(folder / "tokenizer.json") or {}
        vocab = (data.get("model") or {}).get("vocab") or {}
        self._vocab = dict(vocab) if isinstance(vocab, dict) else {piece[0]: i for i, piece in enumerate(vocab)}
        self._vocab.update({t["content"]: t["id"] for t in data.get("added_tokens") or []})

    def get_vocab(self) -> dict[str, int]:
        return self._vocab


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def folder_chat_format(folder: Path) -> Optional[ChatFormat]:
    """The chat format of the tokenizer saved in an adapter folder or a merged export (the run's: its template and
    stop tokens); None for a folder without a tokenizer (vLLM then says what it lacks)."""
    if not (folder / "tokenizer_config.json").is_file():
        return None
    return chat_format(SavedTokenizer(folder))


def served_chat_format(adapters: list[ServedAdapter]) -> Optional[ChatFormat]:
    """The chat format vLLM serves: the first adapter's tokenizer is its --tokenizer, whose template renders every
    request, whichever adapter it names. Adapters trained with another format are refused: their prompts would be
    rendered otherwise than they were trained."""
    formats = [(a, folder_chat_format(a.adapter.path)) for a in adapters]
    first, fmt = formats[0]
    for a, other in formats[1:]:
        if other is not None and fmt is not None and (other.template, other.stop_ids) != (fmt.template, fmt.stop_ids):
            raise PreflightError(
                f"{first.name} and {a.name} were trained with different chat formats ({first.name}: "
                f"{fmt.describe()}; {a.name}: {other.describe()}, another template or stop tokens): one vLLM server "
                "renders every request with one chat template, its tokenizer's. Serve them on two servers (kit serve "
                "RUN_A --port 8000; kit serve RUN_B --port 8001).")
    return fmt


def base_generation_config(base: str, cfg: dict) -> dict:
    """The base's generation_config.json, as vLLM reads it with --generation-config auto (its config.json's token
    ids where it has none)."""
    local = Path(base).expanduser()
    try:
        if local.is_dir():
            return json.loads((local / "generation_config.json").read_text())
        from huggingface_hub import hf_hub_download
        return json.loads(Path(hf_hub_download(base, "generation_config.json", token=env.hf_token())).read_text())
    except Exception:  # none (or not readable): vLLM then reads the token ids of config.json
        return {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}


def stopping_config(base: str, cfg: dict, fmt: Optional[ChatFormat]) -> Optional[dict]:
    """The generation config that makes vLLM stop base + adapter's answers at every stop token of the run's chat
    format, as kit ask, kit verify and the merged export do: the base's own, with the stop ids it lacks added to
    its eos_token_id (vLLM stops at those and at the tokenizer's eos). None when the base's own has them all
    (Llama 3.1 Instruct's stops at its three, a merged export at its run's; SmolLM2's at <|im_end|>, not at
    <|endoftext|>)."""
    if fmt is None or not fmt.stop_ids:
        return None
    own = base_generation_config(base, cfg)
    eos = own.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    missing = [i for i in fmt.stop_ids if i not in eos]
    if not missing:
        return None
    return {**own, "eos_token_id": eos + missing}


def lora_rank(rank: int, asked: Optional[int] = None) -> int:
    """vLLM's --max-lora-rank for adapters of `rank`: `asked` (room for larger adapters loaded at run time),
    else the smallest allowed value that holds them."""
    if asked is not None:
        if asked not in LORA_RANKS:
            raise PreflightError(f"--max-lora-rank {asked}: vLLM allows only {', '.join(map(str, LORA_RANKS))}.")
        if asked < rank:
            raise PreflightError(f"--max-lora-rank {asked} is below the adapters' rank {rank}: vLLM would refuse "
                                 "them; leave it out, or pass a larger value.")
        return asked
    allowed = next((r for r in LORA_RANKS if r >= rank), None)
    if allowed is None:
        raise PreflightError(f"adapter rank {rank} exceeds vLLM's largest --max-lora-rank (512); serve merged.")
    return allowed
