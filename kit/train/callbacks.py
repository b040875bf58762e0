"""Trainer callbacks: metrics to JSONL, sample answers, the trackers' record, the guide's overfitting alarm,
and checkpoint completeness. Behind the import boundary (see kit.train.backend): imported by kit.train.trainer after
the backend is active."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from transformers import TrainerCallback

from kit.data.heldout import HeldOut
from kit.models.template import continuation
from kit.run.rundir import COMPLETE, RunDir, append_metrics, checkpoint_name, rotate_checkpoints
from kit.train import trackers

log = logging.getLogger("kit")


class MetricsFile(TrainerCallback):
    """Appends every log (train and eval) as one JSON line with its step."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        append_metrics(self.path, {"step": state.global_step,
                                   **{k: v for k, v in logs.items() if isinstance(v, (int, float))}})


class SampleAnswers(TrainerCallback):
    """At each evaluation, greedy answers to a few held-out prompts beside the answers they were trained toward:
    one metrics.jsonl row {"step", "samples": [{question, answer, reference}]}, the console, the trackers."""

    def __init__(self, examples: list[HeldOut], max_new_tokens: int, metrics: Path, names: list[str],
                 writer=None, unsloth: bool = False):
        self.examples, self.max_new_tokens, self.metrics = examples, max_new_tokens, metrics
        self.names, self.writer, self.unsloth = names, writer, unsloth

    def on_evaluate(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not self.examples or not state.is_world_process_zero:
            return
        if self.unsloth:  # Unsloth's generate() returns to training (checkpointing too) only from training mode
            model.train()
        rows = []
        for e in self.examples:
            ids = processing_class(e.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            rows.append({"question": e.question, "answer": continuation(model, processing_class, ids,
                                                                         self.max_new_tokens),
                         "reference": e.reference})
        append_metrics(self.metrics, {"step": state.global_step, "samples": rows})
        trackers.log_samples(self.names, state.global_step, rows, self.writer)
        for r in rows:
            log.info(f"step {state.global_step} sample: {_short(r['question'])} -> {_short(r['answer'])} "
                     f"(reference: {_short(r['reference'])})")


def _short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= n else text[:n - 1] + "…")


class TrackerRecord(TrainerCallback):
    """Logs the run's config and manifest to the trackers once RunRecord has written them; after transformers'
    integrations, which the Trainer places before the kit's callbacks, have started their runs."""

    def __init__(self, names: list[str], run: RunDir, writer=None):
        self.names, self.run, self.writer = names, run, writer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            trackers.log_record(self.names, self.run, self.writer)


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
    """Calls `write` (the run's record: kit.run.rundir.begin) once training really starts: after the Trainer has
    loaded the model and, on resume, the checkpoint and its optimizer state, so that a run that fails to
    start leaves the record of the earlier run as it was."""

    def __init__(self, write: Callable[[], None]):
        self.write = write

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.write()

