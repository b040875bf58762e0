"""The train section: Hugging Face TrainingArguments by name, the method (sft, dpo, orpo) and what the kit adds
(warmup, checkpoints, trackers, sample answers)."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from kit.config.issue import SEEDS, Issue, closest

CUDA_ONLY_OPTIMIZERS = ("adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit")
MAX_STEPS = 1_000_000  # optimizer steps a plan may count: more is a typo, and its schedule would not fit in memory
TRACKERS = ("tensorboard", "wandb", "mlflow")  # what train.report_to sets up (kit.train.trackers)
NO_TRACKER = "none"
# TrainConfig fields the kit applies itself; every other TrainConfig field is a TrainingArguments field of
# the same name and meaning and reaches SFTConfig as it is.
TRAIN_KIT_ONLY = {
    "warmup_ratio": "folded with warmup_steps into SFTConfig.warmup_steps (a value < 1 is a ratio)",
    "warmup_steps": "folded with warmup_ratio into SFTConfig.warmup_steps",
    "gradient_checkpointing": "resolved by the memory estimate (kit.train.memory); the backend enables its own variant",
    "tiled_mlp": "resolved by the memory estimate (kit.train.memory); Unsloth's unsloth_tiled_mlp at load",
    "train_sampling_strategy": "auto is resolved for the device (kit.train.plan.execution), then passed by name",
    "padding_free": "auto is resolved for the device and backend (kit.train.plan.execution), then passed by name",
    "resume_from_checkpoint": "'auto' is resolved by the run directory (kit.run.rundir)",
    "save_total_limit": "the kit's rotation (kit.train.callbacks.MarkComplete), which counts complete checkpoints only",
    "early_stopping_patience": "transformers' EarlyStoppingCallback",
    "early_stopping_threshold": "transformers' EarlyStoppingCallback",
    "overfit_patience": "the kit's OverfitAlarm callback",
    "report_to": "tensorboard: a TensorBoardCallback writing into the run directory (the sample answers' too); "
                 "wandb and mlflow reach SFTConfig.report_to, their records set up in the run directory "
                 "(kit.train.trackers)",
    "sample_prompts": "the kit's SampleAnswers callback",
    "sample_max_new_tokens": "the kit's SampleAnswers callback",
    "method": "picks the trainer: TRL's SFTTrainer, DPOTrainer or ORPOTrainer (kit.train.trainer)",
    "beta": "DPOConfig.beta or ORPOConfig.beta",
    "loss_type": "DPOConfig.loss_type",
}


@dataclass
class TrainConfig:
    """Named as in TrainingArguments; all but TRAIN_KIT_ONLY pass through to SFTConfig by name."""

    method: Literal["sft", "dpo", "orpo"] = "sft"
    """sft: supervised fine-tuning on answers (TRL's SFTTrainer). dpo: preference training on pairs (prompt, chosen,
    rejected) with TRL's DPOTrainer; the reference model is the base with the adapter disabled (no second copy).
    orpo: preference training without a reference model (TRL's ORPOTrainer), SFT and preference in one stage.
    dpo and orpo read preference data (kit.data.preference; the shipped pairs: data.path=kit:ko_pairs)."""
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
    off when the run's estimated peak fits model.gpu_memory_gib (the fastest); else on for as few layers as fit,
    the others keeping their activations (Unsloth's checkpoint_skip_layers: the budget's room beyond full
    recompute, spent on speed); true: every layer."""
    tiled_mlp: Union[Literal["auto"], bool] = "auto"
    """Run each layer's MLP over tiles of the sequence (Unsloth's tiled MLP, its "arctic" tiles of hidden-size
    rows), so that a long example's MLP intermediates, the largest part of a recomputed layer, are never whole.
    Needs gradient checkpointing and a CUDA GPU with the Unsloth backend. auto: on when the run fits
    model.gpu_memory_gib only with it (kit.train.memory), e.g. Llama 3.1 8B QLoRA past ~81k tokens at 24 GiB."""
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


# ---------------------------------------------------------------- validation

def issues(t: TrainConfig) -> Iterator[Issue]:
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
                        f"{closest(name, [*TRACKERS, NO_TRACKER])}")
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
    if t.tiled_mlp is True and t.gradient_checkpointing is False:
        yield Issue("train.tiled_mlp", "train.tiled_mlp=true with train.gradient_checkpointing=false: the tiles save "
                    "memory inside recomputed layers. Set train.gradient_checkpointing=true (or auto), or "
                    "train.tiled_mlp=auto.")
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
