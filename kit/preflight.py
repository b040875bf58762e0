"""kit serve's preflight: what vLLM would refuse, or silently get wrong, checked before it starts. The
result is a ServeSpec: what to serve, and how (kit.serve launches it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from kit.errors import PreflightError
from kit.llama import PROJECTIONS
from kit.rundir import Adapter, RunDir, base_config, read_adapter

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
        problems.append(f"it targets {bad}, which vLLM's Llama LoRA does not support")
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
        return ServeSpec(base=str(folder), tokenizer=str(folder), fp8=fp8, kv_cache_dtype=kv_cache_dtype,
                         max_model_len=max_model_len or runs[0].trained_length(), log=runs[0].serve_merged_log)
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
    length = max_model_len or trained_len
    if length and limit and length > limit:
        raise PreflightError(f"--max-model-len {length} exceeds the base's max_position_embeddings {limit}.")
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
                     kv_cache_dtype=kv_cache_dtype, max_model_len=length, notes=notes, log=runs[0].serve_log)


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
