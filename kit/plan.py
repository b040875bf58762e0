"""Step arithmetic of a run, as the guide explains it and as Hugging Face's Trainer counts.

examples / (batch x accumulation x devices) = steps per epoch; 2400 / (8 x 4) = 75, so a run of
3 epochs saving each epoch writes checkpoint-75, checkpoint-150, checkpoint-225.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from kit.config import Config
from kit.rundir import checkpoint_name


@dataclass
class Plan:
    examples: int
    eval_examples: int
    devices: int
    effective_batch: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    warmup_steps: int
    eval_at: list[int] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    max_tokens_per_step: int = 0
    mean_tokens_per_step: Optional[float] = None

    def render(self) -> str:
        def few(items):
            return ", ".join(map(str, items[:6])) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")
        rows = [
            ("training examples", f"{self.examples:,}"),
            ("eval examples", f"{self.eval_examples:,}"),
            ("effective batch", f"{self.effective_batch} (batch x accumulation x {self.devices} device(s))"),
            ("steps per epoch", f"{self.steps_per_epoch:,}"),
            ("epochs", f"{self.epochs:g}"),
            ("total steps", f"{self.total_steps:,}"),
            ("warmup steps", f"{self.warmup_steps:,}"),
            ("evaluations at steps", few(self.eval_at) or "none"),
            ("checkpoints", few(self.checkpoints) or "none"),
            ("tokens per step", f"at most {self.max_tokens_per_step:,}"
             + (f", about {self.mean_tokens_per_step:,.0f} with this data" if self.mean_tokens_per_step else "")),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def make_plan(cfg: Config, examples: int, eval_examples: int = 0, devices: int = 1,
              mean_tokens_per_example: Optional[float] = None) -> Plan:
    t = cfg.train
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * devices
    batches = math.ceil(examples / (t.per_device_train_batch_size * devices))
    # Trainer: an epoch's last partial accumulation still makes an optimizer step
    steps_per_epoch = max(math.ceil(batches / t.gradient_accumulation_steps), 1)
    if t.max_steps > 0:
        total = t.max_steps
        epochs = total / steps_per_epoch
    else:
        total = math.ceil(t.num_train_epochs * steps_per_epoch)
        epochs = t.num_train_epochs
    warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(total * (t.warmup_ratio or 0.0))
    epoch_ends = [min(steps_per_epoch * e, total) for e in range(1, math.ceil(total / steps_per_epoch) + 1)]

    def schedule(strategy: str, every: int) -> list[int]:
        if strategy == "no":
            return []
        if strategy == "epoch":
            return epoch_ends
        return list(range(every, total + 1, every))

    eval_at = schedule(t.eval_strategy, t.eval_steps or t.logging_steps) if eval_examples else []
    save_at = schedule(t.save_strategy, t.save_steps)
    if t.save_strategy != "no" and (not save_at or save_at[-1] != total):
        save_at.append(total)  # Trainer also saves when training ends
    mean_tokens = mean_tokens_per_example * per_step if mean_tokens_per_example else None
    if cfg.train.packing and mean_tokens:
        mean_tokens = None  # packed rows are full: the bound is the figure
    return Plan(examples=examples, eval_examples=eval_examples, devices=devices, effective_batch=per_step,
                steps_per_epoch=steps_per_epoch, total_steps=total, epochs=epochs, warmup_steps=warmup,
                eval_at=eval_at, checkpoints=[checkpoint_name(s) for s in save_at],
                max_tokens_per_step=per_step * cfg.model.max_seq_length, mean_tokens_per_step=mean_tokens)
