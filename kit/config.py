"""The kit's one typed configuration: recipe YAML + dotted CLI overrides -> validated dataclasses.

Names follow Hugging Face's ``TrainingArguments`` and the Korean guide the kit is built around, so a
value read in the guide (``per_device_train_batch_size = 8``) is written the same way here.
Everything is checked here, before any weights load.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_PRESETS = {"all-linear": ALL_LINEAR, "qkv": ["q_proj", "k_proj", "v_proj"]}
OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit", "adafactor")
CUDA_ONLY_OPTIMIZERS = ("adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit")


class ConfigError(ValueError):
    """A configuration problem, phrased for the user: what, where, and what to do."""


@dataclass
class ModelConfig:
    name: str = "meta-llama/Llama-3.1-8B-Instruct"
    """Hub id or local folder of the base model. 'random:tiny' or 'random:8b' build a random-weight
    model of the Llama 3.1 architecture (for demos, tests and benchmarks; no download)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of the base model."""
    tokenizer: Optional[str] = None
    """Tokenizer id or path; default: the model's own. The kit installs Llama 3.1's chat template."""
    backend: Literal["auto", "unsloth", "hf"] = "auto"
    """auto: Unsloth (fast kernels on CUDA, its CPU fallback elsewhere); hf: transformers + PEFT."""
    load_in_4bit: bool = True
    """QLoRA: quantize the frozen base to 4-bit NF4 with bitsandbytes (needs CUDA)."""
    max_seq_length: int = 2048
    """Longest training sequence in tokens; longer examples are truncated or dropped (data.overlong)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto: bf16 where the GPU supports it, else fp16 with loss scaling; fp32 on CPU."""
    random_seed: int = 0
    """Seed of the random weights when name is 'random:*'."""


@dataclass
class LoraConfig:
    r: int = 16
    """Rank of the LoRA matrices."""
    alpha: int = 32
    """LoRA scaling numerator (lora_alpha); the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    dropout: float = 0.0
    """Dropout on the LoRA input (0 lets Unsloth use its fastest path)."""
    target_modules: Union[str, list[str]] = "all-linear"
    """'all-linear' (the 7 projections), 'qkv' (q/k/v only, as in the guide's picture) or a list."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scaling."""
    use_dora: bool = False
    """DoRA; vLLM cannot serve it, so it also needs allow_unservable."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Train biases; anything but 'none' is not servable by vLLM."""
    modules_to_save: list[str] = field(default_factory=list)
    """Fully trained extra modules (e.g. embed_tokens, lm_head); not servable by vLLM as an adapter."""
    allow_unservable: bool = False
    """Opt in to DoRA, bias or modules_to_save although vLLM cannot serve the adapter (serve merged)."""


@dataclass
class TrainConfig:
    per_device_train_batch_size: int = 8
    """Examples per device per forward pass (the guide's 'batch size')."""
    per_device_eval_batch_size: int = 8
    """Examples per device per evaluation forward pass."""
    gradient_accumulation_steps: int = 4
    """Forward passes accumulated into one optimizer step."""
    num_train_epochs: float = 3.0
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Total optimizer steps; > 0 overrides num_train_epochs."""
    learning_rate: float = 1e-4
    """Peak learning rate (the guide: start at 1e-4; sensible range 1e-6..1e-3)."""
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    """How the learning rate decays after warmup."""
    warmup_ratio: Optional[float] = None
    """Fraction of total steps spent warming up (set this or warmup_steps)."""
    warmup_steps: Optional[int] = None
    """Warmup length in steps (set this or warmup_ratio)."""
    optim: Literal["adamw_torch", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit", "adafactor"] = "adamw_torch"
    """Optimizer; the 8-bit and paged ones need bitsandbytes on CUDA."""
    weight_decay: float = 0.0
    """Decoupled weight decay of AdamW."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    logging_steps: int = 10
    """Log train loss every N steps."""
    eval_strategy: Literal["no", "steps", "epoch"] = "steps"
    """When to evaluate on the eval split."""
    eval_steps: Optional[int] = None
    """Evaluate every N steps (eval_strategy=steps); default: logging_steps."""
    save_strategy: Literal["no", "steps", "epoch"] = "epoch"
    """When to write checkpoints."""
    save_steps: int = 500
    """Checkpoint every N steps (save_strategy=steps)."""
    save_total_limit: Optional[int] = 3
    """Keep at most this many checkpoints (the best one is always kept when early stopping)."""
    early_stopping_patience: Optional[int] = None
    """Stop after this many evaluations without improvement; keeps the best checkpoint."""
    early_stopping_threshold: float = 0.0
    """Minimum eval-loss improvement that counts."""
    overfit_patience: int = 2
    """Warn when eval loss rose for this many evaluations in a row while train loss fell."""
    resume_from_checkpoint: Optional[str] = None
    """'auto' (latest checkpoint of this run) or a checkpoint folder; resume is always explicit."""
    seed: int = 42
    """Seed for data shuffling, LoRA init and dropout."""
    packing: bool = False
    """Pack several short examples into one max_seq_length row (no cross-example attention)."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward to save memory (Unsloth's offloaded variant on that backend)."""
    report_to_tensorboard: bool = True
    """Also write TensorBoard event files under the run directory."""


@dataclass
class DataConfig:
    path: str = "beomi/KoAlpaca-v1.1a"
    """Hub dataset id, or a local .json/.jsonl/.csv/.parquet file or folder. 'kit:ko_sample' is the
    Korean sample set shipped inside the kit."""
    subset: Optional[str] = None
    """Hub dataset configuration name."""
    split: str = "train"
    """Split to train on."""
    revision: Optional[str] = None
    """Hub dataset revision."""
    format: Literal["auto", "koalpaca", "alpaca", "messages", "prompt_completion", "text"] = "auto"
    """Row format; auto detects it from the columns."""
    fields: dict[str, str] = field(default_factory=dict)
    """Map the kit's field names to your columns, e.g. {instruction: question, output: answer}."""
    eval_ratio: float = 0.05
    """Fraction of the data held out for evaluation when there is no eval_path."""
    eval_path: Optional[str] = None
    """A separate evaluation source (same kinds as path)."""
    eval_split: Optional[str] = None
    """Split of eval_path (or of path, e.g. 'validation') used for evaluation."""
    system_prompt: Optional[str] = None
    """System message added to every example that has none."""
    train_on_responses_only: bool = True
    """Loss only on assistant turns (their <|eot_id|> included); prompts are masked with -100."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """What to do with examples longer than max_seq_length."""
    max_examples: Optional[int] = None
    """Use only the first N training examples (quick experiments)."""


@dataclass
class RunConfig:
    name: str = "llama31_sft"
    """Run directory name under output_dir."""
    output_dir: str = "runs"
    """Parent folder of run directories."""
    overwrite: bool = False
    """Replace an existing run directory (the old one is moved aside, not deleted)."""


@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=list)
    """Exports written after training, into RUN_DIR/export/: merged16 and/or gguf (see kit export)."""
    gguf_quant: str = "q8_0"
    """GGUF type for the gguf export: f16, bf16, q8_0, q4_k_m or q5_k_m."""


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


# ---------------------------------------------------------------- loading and overrides

def _closest(key: str, valid: list[str]) -> str:
    best = difflib.get_close_matches(key, valid, n=2, cutoff=0.5)
    if not best:
        return "" if len(valid) < 10 else f" Valid keys: {', '.join(valid)}."
    return f" Did you mean '{best[0]}'" + (f" (or '{best[1]}')?" if len(best) > 1 else "?")


def all_keys(cls=Config, prefix="") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys += all_keys(f.default_factory, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check/convert one value against its type hint; the error names the key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1])
    if origin is Literal:
        if value is False and "no" in args:
            value = "no"  # YAML 1.1 reads a bare `no` as false
        if value not in args:
            options = [str(a) for a in args]
            raise ConfigError(f"{where}: '{value}' is not one of {', '.join(options)}.{_closest(str(value), options)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping like {{key: value}}, got {value!r}.")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}.")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected a whole number, got {value!r}.")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}.")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected text, got {value!r}.")
    raise ConfigError(f"{where}: unsupported type {hint}.")  # pragma: no cover - a kit bug


def _build(cls, data: dict, where: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{where or 'top level'}' must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{where}{key}"
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{full}'.{_closest(full, all_keys())}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{full}.", source)
        else:
            kwargs[key] = _coerce(value, hint, f"{source}: {full}")
    return cls(**kwargs)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.learning_rate=2e-4).")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads '2e-4' as text
    return key.strip().split("."), value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
        return text.strip().lower() not in ("nan", "inf", "-inf", "infinity")
    except ValueError:
        return False


def load_config(path: Optional[str | os.PathLike], overrides: list[str] = ()) -> Config:
    """Read a recipe YAML, apply dotted overrides, return a validated Config."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe file {p} does not exist. Pass --config with a YAML file from recipes/.")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        source = str(p)
    for item in overrides:
        keys, value = parse_override(item)
        if len(keys) < 2:
            raise ConfigError(f"override '{item}': keys have a section, like train.{keys[0]}.{_closest(keys[0], all_keys())}")
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{k}' is not a section.")
        node[keys[-1]] = value
    for k in (k for k in list(data) if "=" in str(k)):
        raise ConfigError(f"{source}: key '{k}' looks like an override; write it as 'key: value' in YAML.")
    cfg = _build(Config, data, "", source if not overrides else f"{source} + overrides")
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- validation

def _check(cond: bool, msg: str):
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    """Ranges and combinations; everything that needs no weights and no data."""
    m, lo, t, d = cfg.model, cfg.lora, cfg.train, cfg.data
    _check(bool(m.name.strip()), "model.name is empty: give a Hub id or a local model folder.")
    if m.name.startswith("random:"):
        from kit.tiny import SHAPES
        _check(m.name[7:] in SHAPES, f"model.name: unknown random shape '{m.name[7:]}'; use one of "
               + ", ".join(f"random:{s}" for s in SHAPES) + ".")
    _check(16 <= m.max_seq_length <= 131072, f"model.max_seq_length={m.max_seq_length}: use 16..131072 "
           "(the guide: 512-4096 for chat fine-tuning).")
    _check(1 <= lo.r <= 512, f"lora.r={lo.r}: use 1..512 (8-64 is usual).")
    _check(lo.alpha > 0, f"lora.alpha={lo.alpha}: must be > 0.")
    _check(0.0 <= lo.dropout < 1.0, f"lora.dropout={lo.dropout}: use 0 <= dropout < 1.")
    if isinstance(lo.target_modules, str):
        _check(lo.target_modules in TARGET_PRESETS, f"lora.target_modules='{lo.target_modules}': use "
               f"{' or '.join(TARGET_PRESETS)} or a list of module names.")
    else:
        _check(bool(lo.target_modules), "lora.target_modules is empty.")
        bad = [x for x in lo.target_modules if x not in ALL_LINEAR]
        _check(not bad, f"lora.target_modules: {bad} are not Llama linear projections; choose from {ALL_LINEAR}"
               " (embed_tokens/lm_head go in lora.modules_to_save).")
    unservable = (["use_dora (vLLM does not serve DoRA adapters)"] if lo.use_dora else []) + \
        ([f"bias='{lo.bias}' (vLLM serves LoRA adapters without bias)"] if lo.bias != "none" else []) + \
        ([f"modules_to_save={lo.modules_to_save} (vLLM does not load fully trained modules from an adapter)"]
         if lo.modules_to_save else [])
    _check(not unservable or lo.allow_unservable,
           "lora: " + "; ".join(unservable) + ". The adapter could not be served by vLLM. Set "
           "lora.allow_unservable=true to train it anyway and serve the merged export instead.")
    for k in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
              "logging_steps", "save_steps"):
        _check(getattr(t, k) >= 1, f"train.{k}={getattr(t, k)}: must be >= 1.")
    _check(t.max_steps > 0 or t.num_train_epochs > 0, "train: set num_train_epochs > 0 or max_steps > 0.")
    _check(t.max_steps == -1 or t.max_steps > 0, f"train.max_steps={t.max_steps}: use -1 (epochs) or > 0.")
    _check(0 < t.learning_rate <= 1e-2, f"train.learning_rate={t.learning_rate}: expected 0 < lr <= 1e-2 "
           "(the guide: 1e-6..1e-3, start at 1e-4).")
    _check(not (t.warmup_ratio is not None and t.warmup_steps is not None),
           "train: warmup_ratio and warmup_steps are both set; keep one (ratio of total steps, or steps).")
    _check(t.warmup_ratio is None or 0 <= t.warmup_ratio < 1, f"train.warmup_ratio={t.warmup_ratio}: use 0..1.")
    _check(t.warmup_steps is None or t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps}: must be >= 0.")
    _check(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay}: must be >= 0.")
    _check(t.max_grad_norm >= 0, f"train.max_grad_norm={t.max_grad_norm}: must be >= 0 (0 disables clipping).")
    _check(t.eval_steps is None or t.eval_steps >= 1, f"train.eval_steps={t.eval_steps}: must be >= 1.")
    _check(t.save_total_limit is None or t.save_total_limit >= 1,
           f"train.save_total_limit={t.save_total_limit}: must be >= 1 or null (keep all).")
    _check(t.overfit_patience >= 1, f"train.overfit_patience={t.overfit_patience}: must be >= 1.")
    has_eval = d.eval_ratio > 0 or d.eval_path is not None or d.eval_split is not None
    _check(t.eval_strategy == "no" or has_eval,
           f"train.eval_strategy='{t.eval_strategy}' but there is no eval data: set data.eval_ratio > 0, "
           "data.eval_path or data.eval_split, or train.eval_strategy=no.")
    if t.early_stopping_patience is not None:
        _check(t.early_stopping_patience >= 1, "train.early_stopping_patience must be >= 1.")
        _check(t.eval_strategy != "no", "train.early_stopping_patience needs evaluation: set train.eval_strategy.")
        _check(t.save_strategy == t.eval_strategy,
               f"train.early_stopping_patience keeps the best checkpoint, so save_strategy "
               f"('{t.save_strategy}') must equal eval_strategy ('{t.eval_strategy}').")
        if t.eval_strategy == "steps":
            _check(t.save_steps % (t.eval_steps or t.logging_steps) == 0,
                   "train.early_stopping_patience: save_steps must be a multiple of eval_steps.")
    _check(not (t.packing and m.backend == "hf"),
           "train.packing=true with model.backend=hf: transformers' SDPA attention would let packed examples "
           "attend to each other. Use model.backend=unsloth (its varlen kernels keep them apart) or packing=false.")
    _check(0 <= d.eval_ratio < 1, f"data.eval_ratio={d.eval_ratio}: use 0 <= ratio < 1.")
    _check(d.max_examples is None or d.max_examples >= 1, "data.max_examples must be >= 1.")
    from kit.data import FIELD_NAMES
    bad = [k for k in d.fields if k not in FIELD_NAMES]
    _check(not bad, f"data.fields: unknown field {bad}; map these kit fields to your columns: {FIELD_NAMES}.")
    from kit.export import FORMATS, QUANTS
    bad = [f for f in cfg.export.formats if f not in FORMATS]
    _check(not bad, f"export.formats: {bad} unknown; use {' and/or '.join(FORMATS)}.")
    _check(cfg.export.gguf_quant in QUANTS, f"export.gguf_quant='{cfg.export.gguf_quant}': use one of {', '.join(QUANTS)}.")
    _check(bool(cfg.run.name) and "/" not in cfg.run.name and cfg.run.name not in (".", ".."),
           f"run.name='{cfg.run.name}': use a plain folder name.")


def check_device(cfg: Config, cuda: bool, bf16_ok: bool) -> None:
    """Combinations that depend on the hardware; still before any weights load."""
    t, m = cfg.train, cfg.model
    if not cuda:
        _check(t.optim not in CUDA_ONLY_OPTIMIZERS,
               f"train.optim='{t.optim}' needs bitsandbytes on a CUDA GPU and none is present. "
               "Use train.optim=adamw_torch (or adafactor) on this machine.")
        _check(not m.load_in_4bit, "model.load_in_4bit=true (QLoRA) needs a CUDA GPU and none is present. "
               "Use model.load_in_4bit=false on this machine.")
        _check(m.precision != "fp16", "model.precision=fp16 needs a CUDA GPU; use auto, bf16 or fp32 on CPU.")
        _check(not t.packing, "train.packing=true needs a CUDA GPU: packed examples are kept apart by "
               "FlashAttention's variable-length kernels, which CPUs lack. Set train.packing=false here.")
    else:
        _check(m.precision != "bf16" or bf16_ok, "model.precision=bf16: this GPU does not support bf16 "
               "(Ampere or newer does); use precision=fp16 (with loss scaling) or auto.")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def describe() -> str:
    """Every key with its default and docstring, for --help-config."""
    import ast, inspect
    lines = []
    for sect in dataclasses.fields(Config):
        cls = sect.default_factory
        docs = {}
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = " ".join(b.value.value.split())
        lines.append(f"{sect.name}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name} = {default!r}\n      {docs.get(f.name, '')}")
    return "\n".join(lines)
