"""The whole configuration (Config: one section each), checked at once: each section's checks, the settings of
different sections that cannot go together, and what depends on the machine or the network, all before any
weights load."""
from __future__ import annotations

import ast
import dataclasses
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kit.config import data, export, lora, model, run, train
from kit.config.data import DataConfig, DataSource
from kit.config.export import ExportConfig
from kit.config.issue import Issue
from kit.config.lora import TARGET_PRESETS, LoraConfig
from kit.config.model import ModelConfig
from kit.config.run import RunConfig
from kit.config.train import CUDA_ONLY_OPTIMIZERS, TrainConfig
from kit.core.errors import ConfigError
from kit.models.gguf_source import is_gguf_source
from kit.models.hub import check_model


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    @property
    def target_modules(self) -> list[str]:
        t = self.lora.target_modules
        return list(TARGET_PRESETS[t]) if isinstance(t, str) else list(t)


# ---------------------------------------------------------------- validation across sections; the machine, the network

def _combination_issues(cfg: Config) -> Iterator[Issue]:
    """Settings of different sections that cannot go together."""
    t, d = cfg.train, cfg.data
    has_eval = d.eval_ratio > 0 or d.eval_path is not None or d.eval_split is not None
    if t.eval_strategy != "no" and not has_eval:
        yield Issue("train.eval_strategy", f"train.eval_strategy='{t.eval_strategy}' but there is no eval data: set "
                    "data.eval_ratio > 0, data.eval_path or data.eval_split, or train.eval_strategy=no.")
    if t.sample_max_new_tokens > cfg.model.max_seq_length:
        yield Issue("train.sample_max_new_tokens", f"train.sample_max_new_tokens={t.sample_max_new_tokens} is longer "
                    f"than model.max_seq_length={cfg.model.max_seq_length}, the longest sequence the run trains on; "
                    f"each evaluation would wait on answers that long. Use at most {cfg.model.max_seq_length} (the "
                    "default 64 shows the start of each answer).")
    if t.method != "sft" and t.packing:
        yield Issue("train.packing", f"train.packing=true with train.method={t.method}: preference pairs are not "
                    "packed; set train.packing=false.")
    if t.packing and cfg.model.backend == "hf":
        yield Issue("train.packing", "train.packing=true with model.backend=hf: transformers' SDPA attention would "
                    "let packed examples attend to each other. Use model.backend=unsloth (its varlen kernels keep "
                    "them apart) or packing=false.")
    if t.padding_free is True and cfg.model.backend == "hf":
        yield Issue("train.padding_free", "train.padding_free=true with model.backend=hf: transformers' SDPA "
                    "attention would let the concatenated examples attend to each other. Use model.backend=unsloth "
                    "or padding_free=false.")
    if t.tiled_mlp is True and cfg.model.backend == "hf":
        yield Issue("train.tiled_mlp", "train.tiled_mlp=true with model.backend=hf: the tiled MLP is Unsloth's. Use "
                    "model.backend=unsloth, or train.tiled_mlp=auto.")


def validation_issues(cfg: Config) -> list[Issue]:
    """Ranges and combinations; everything that needs no weights and no data."""
    return [*model.issues(cfg.model), *lora.issues(cfg.lora), *train.issues(cfg.train), *data.issues(cfg.data),
            *export.issues(cfg.export), *run.issues(cfg.run), *_combination_issues(cfg)]


def check_device(cfg: Config, cuda: bool, bf16_ok: bool, fp8_ok: bool = False) -> None:
    """Combinations that depend on the hardware (`fp8_ok`: FP8 matmuls, Hopper or newer); still before any
    weights load."""
    t, m = cfg.train, cfg.model
    problems = []
    if not cuda:
        if t.optim in CUDA_ONLY_OPTIMIZERS:
            problems.append(f"train.optim='{t.optim}' needs bitsandbytes on a CUDA GPU and none is present. "
                            "Use train.optim=adamw_torch (or adafactor) on this machine.")
        if m.load_in_4bit:
            problems.append("model.load_in_4bit=true (QLoRA) needs a CUDA GPU and none is present. "
                            "Use model.load_in_4bit=false on this machine.")
        if m.load_in_fp8:
            problems.append("model.load_in_fp8=true needs a CUDA GPU with FP8 matmuls (Hopper or newer) and none "
                            "is present. Use model.load_in_fp8=false on this machine.")
        if m.precision == "fp16":
            problems.append("model.precision=fp16 needs a CUDA GPU; use auto, bf16 or fp32 on CPU.")
        if t.packing:
            problems.append("train.packing=true needs a CUDA GPU: packed examples are kept apart by "
                            "FlashAttention's variable-length kernels, which CPUs lack. Set train.packing=false here.")
        if t.tiled_mlp is True:
            problems.append("train.tiled_mlp=true needs a CUDA GPU (Unsloth tiles the MLP there only). "
                            "Set train.tiled_mlp=auto here.")
        if t.padding_free is True:
            problems.append("train.padding_free=true needs a CUDA GPU (variable-length attention kernels). "
                            "Set train.padding_free=false here.")
        if t.method == "dpo" and m.backend == "hf":
            problems.append("train.method=dpo with model.backend=hf on CPU: TRL's DPO computes its log-probabilities "
                            "with a Triton kernel (its fused LM head) that needs a GPU. Use model.backend=auto "
                            "(Unsloth's CPU path replaces that kernel) on this machine.")
    else:
        if m.precision == "bf16" and not bf16_ok:
            problems.append("model.precision=bf16: this GPU does not support bf16 (Ampere or newer does); use "
                            "precision=fp16 (with loss scaling) or auto.")
        if m.load_in_fp8 and not fp8_ok:
            problems.append("model.load_in_fp8=true: this GPU has no FP8 matmuls for Unsloth's FP8 training "
                            "(Hopper, compute capability 9.0, or newer has). Use model.load_in_4bit=true "
                            "(QLoRA) and load_in_fp8=false.")
    if problems:
        raise ConfigError(*problems)


def check_processes(processes: int, gpus: int) -> None:
    """`processes` training processes (DDP) on this machine, which has `gpus` CUDA GPUs (0: the processes share
    its CPUs, through gloo); before any of them loads."""
    if gpus and processes > gpus:
        raise ConfigError(f"{processes} training processes on this machine but {gpus} GPU(s) visible: each process "
                          f"trains on a GPU of its own. Use --devices {gpus} (torchrun --nproc_per_node {gpus}), or "
                          "check CUDA_VISIBLE_DEVICES.")



def check_models(cfg: Config) -> None:
    """The models a recipe loads: model.name (not for a random-weight model or a GGUF file, which
    kit.models.gguf_source checks) and model.tokenizer."""
    if cfg.model.random_shape is None and not is_gguf_source(cfg.model.name):
        check_model(cfg.model.name, "model.name", cfg.model.revision)
    if cfg.model.tokenizer:
        check_model(cfg.model.tokenizer, "model.tokenizer", cfg.model.revision)


def describe() -> str:
    """Every key with its default and docstring, for --help-config."""
    lines = []
    for sect in dataclasses.fields(Config):
        lines.append(f"{sect.name}:")
        lines += _described(sect.default_factory, "  ")
        if sect.default_factory is DataConfig:
            lines.append("  path[i], an entry of a mixture written as a mapping:")
            lines += _described(DataSource, "    ")
    return "\n".join(lines)


def field_docs(cls) -> dict[str, str]:
    """Each field of a config dataclass with its docstring, on one line (--help-config, kit studio's form)."""
    docs = {}
    body = ast.parse(inspect.getsource(cls)).body[0].body
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _described(cls, indent: str) -> list[str]:
    docs = field_docs(cls)
    return [f"{indent}{f.name} = {f.default if f.default is not dataclasses.MISSING else f.default_factory()!r}"
            f"\n{indent}    {docs.get(f.name, '')}" for f in dataclasses.fields(cls)]
