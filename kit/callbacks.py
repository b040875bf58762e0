"""Trainer callbacks: metrics to JSONL, the guide's overfitting alarm, and checkpoint completeness.
Behind the import boundary (see kit.backend): imported by kit.train after the backend is active."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from transformers import TrainerCallback

from kit.rundir import COMPLETE, checkpoint_name, rotate_checkpoints

log = logging.getLogger("kit")


class MetricsFile(TrainerCallback):
    """Appends every log (train and eval) as one JSON line with its step."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


class OverfitAlarm(TrainerCallback):
    """Warns when eval loss rose `patience` evaluations in a row while train loss fell (the guide's sign
    of overfitting), naming the step with the best eval loss. Warns once per rising stretch."""

    def __init__(self, patience: int):
        self.patience = patience
        self.history: list[tuple[int, float, float | None]] = []  # (step, eval_loss, last train loss)
        self.last_train: float | None = None
        self.alarms: list[dict] = []
        self._alarmed = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.last_train = logs["loss"]

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            alarm = self.observe(state.global_step, metrics["eval_loss"], self.last_train)
            if alarm:
                log.warning(alarm["message"])

    def observe(self, step: int, eval_loss: float, train_loss: float | None) -> dict | None:
        self.history.append((step, eval_loss, train_loss))
        window = self.history[-(self.patience + 1):]
        rising = len(window) == self.patience + 1 and all(b[1] > a[1] for a, b in zip(window, window[1:]))
        if not rising:
            self._alarmed = False
            return None
        first, last = window[0], window[-1]
        falling = first[2] is not None and last[2] is not None and last[2] < first[2]
        if not falling or self._alarmed:
            return None
        self._alarmed = True
        best_step, best_loss, _ = min(self.history, key=lambda h: h[1])
        alarm = {"step": step, "best_step": best_step, "best_eval_loss": best_loss, "message": (
            f"overfitting: eval loss rose for {self.patience} evaluations ({first[1]:.4f} -> {last[1]:.4f}) while "
            f"train loss fell ({first[2]:.4f} -> {last[2]:.4f}). Best eval loss {best_loss:.4f} was at step "
            f"{best_step} ({checkpoint_name(best_step)} if one was saved there). Consider fewer epochs, a lower "
            "learning rate, more data, or train.early_stopping_patience.")}
        self.alarms.append(alarm)
        return alarm


class MarkComplete(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has written all of it (model, optimizer, RNG, state), then
    keeps the newest `keep` complete ones (train.save_total_limit). The kit rotates rather than the Trainer,
    which deletes older checkpoints before the new one is complete: a kill in between left none to resume."""

    def __init__(self, keep: Optional[int] = None):
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / checkpoint_name(state.global_step)
        if args.world_size > 1:  # each rank writes its own RNG state into the checkpoint: all of them first
            args.distributed_state.wait_for_everyone()
        if ckpt.is_dir() and state.is_world_process_zero:
            with open(ckpt / COMPLETE, "w") as f:
                f.write(f"{state.global_step}\n")
                f.flush()
                os.fsync(f.fileno())
            rotate_checkpoints(ckpt.parent, self.keep, state.best_model_checkpoint)


class RunRecord(TrainerCallback):
    """Calls `write` (the run's record: kit.rundir.begin) once training really starts: after the Trainer has
    loaded the model and, on resume, the checkpoint and its optimizer state, so that a run that fails to
    start leaves the record of the earlier run as it was."""

    def __init__(self, write: Callable[[], None]):
        self.write = write

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.write()

