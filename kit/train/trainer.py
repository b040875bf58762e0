"""Training: TRL's SFTConfig (or DPOConfig, ORPOConfig: train.method) from the config, the trainer with the kit's
callbacks, and the run of it.

Behind the import boundary (see kit.train.backend): the recipe imports this module once the backend is
active, so the transformers, TRL and PEFT imported here carry Unsloth's patches when Unsloth trains.
"""
from __future__ import annotations

import dataclasses
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from peft import PeftModel
from torch.utils.tensorboard import SummaryWriter
from transformers import DataCollatorForSeq2Seq, EarlyStoppingCallback, Trainer
from transformers.integrations import TensorBoardCallback
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from trl.data_utils import pack_dataset
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from kit.config.schema import Config
from kit.data.heldout import held_out
from kit.data.load import TrainingData
from kit.data.preference import REFERENCE, held_out_pairs, preference_accuracy
from kit.run.rundir import RunDir, tokens_seen
from kit.train import trackers
from kit.train.backend import Backend, Kernels, kernels
from kit.train.callbacks import MarkComplete, MetricsFile, OverfitAlarm, RunRecord, SampleAnswers, TrackerRecord
from kit.train.model import load_model
from kit.train.plan import Execution, Plan, execution, make_plan

log = logging.getLogger("kit")


@dataclass
class Trained:
    """What one training process produced."""
    model: PeftModel
    steps: int
    """The optimizer step reached (counted from the run's start, also when resumed)."""
    seconds: float
    tokens: int
    """Non-padding input tokens trained in this process."""
    alarms: list[dict]
    """The overfitting alarms raised (kit.train.callbacks.OverfitAlarm)."""
    peak_gib: float
    peak_kind: str
    kernels: Kernels
    host_peak_gib: float
    """The process's peak resident memory (the offloaded checkpoints' pinned buffers among it)."""
    preference: Optional[dict] = None
    """DPO, ORPO: the held-out preference accuracy (kit.data.preference.preference_accuracy)."""


def plan(cfg: Config, backend: Backend, data: TrainingData, devices: int = 1) -> Plan:
    """The step plan for this data (with packing, for the rows TRL will pack it into) and how its steps
    run on this machine: micro-batches, checkpointing, the GPU memory estimate."""
    examples = len(data.train.dataset)
    if cfg.train.packing:
        examples = len(pack_dataset(data.train.dataset, cfg.model.max_seq_length, strategy="bfd"))
    steps = make_plan(cfg, examples, len(data.eval.dataset) if data.eval else 0, devices, data.train.mean_tokens)
    if cfg.train.method == "sft":
        lengths = [len(ids) for ids in data.train.dataset["input_ids"]]
    else:  # a pair's two padded rows (chosen and rejected): kit.data.preference
        lengths = list(data.train.dataset["tokens"])
    how = execution(cfg, lengths, cuda=backend.device.cuda, card_gib=backend.device.memory_gib,
                    steps=steps.total_steps, devices=devices, host_gib=backend.device.host_gib)
    return dataclasses.replace(steps, execution=how)


def method_record(cfg: Config) -> dict:
    """The manifest's lines about the training method."""
    t = cfg.train
    if t.method == "sft":
        return {"method": "sft"}
    record = {"method": t.method, "beta": t.beta, "reference": REFERENCE[t.method]}
    return {**record, "loss_type": t.loss_type or "sigmoid"} if t.method == "dpo" else record


def sft_config(cfg: Config, backend: Backend, run: RunDir, how: Execution) -> SFTConfig:
    """train.* passes through by name (TrainConfig.training_arguments); the rest is the kit's choice."""
    return SFTConfig(**_arguments(cfg, backend, run, how), padding_free=how.padding_free)


def preference_config(cfg: Config, backend: Backend, run: RunDir, how: Execution):
    """DPOConfig (beta, loss_type) or ORPOConfig (beta) with the same arguments as SFT's."""
    t = cfg.train
    cls = ORPOConfig if t.method == "orpo" else DPOConfig
    known = {f.name for f in dataclasses.fields(cls)}  # SFT's own (packing) have no meaning here
    args = {k: v for k, v in _arguments(cfg, backend, run, how).items() if k in known}
    if t.method == "orpo":
        return ORPOConfig(**args, beta=t.beta)
    return DPOConfig(**args, beta=t.beta, loss_type=[t.loss_type or "sigmoid"], padding_free=False)


def _arguments(cfg: Config, backend: Backend, run: RunDir, how: Execution) -> dict:
    t = cfg.train
    early = t.early_stopping_patience is not None
    split = dict(per_device_train_batch_size=how.batch, gradient_accumulation_steps=how.grad_accum)
    return dict(
        **{**t.training_arguments(), **split}, output_dir=str(run.checkpoints), data_seed=t.seed,
        train_sampling_strategy=how.sampling,
        warmup_steps=t.warmup_steps if t.warmup_steps is not None else (t.warmup_ratio or 0.0),  # < 1: a ratio
        bf16=backend.precision == "bf16", fp16=backend.precision == "fp16", use_cpu=not backend.device.cuda,
        gradient_checkpointing=False,  # the backend enabled its own variant
        max_length=cfg.model.max_seq_length, report_to=trackers.integrations(t.trackers), run_name=cfg.run.name,
        load_best_model_at_end=early, metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None, include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0, disable_tqdm=False, logging_first_step=True, remove_unused_columns=True,
        # DDP: every LoRA weight gets a gradient each step, so no search for unused ones (which, under
        # checkpointing's recompute, would mark them ready twice); one process ignores it
        ddp_find_unused_parameters=False)


def build_trainer(cfg: Config, backend: Backend, model, tokenizer, data: TrainingData, run: RunDir,
                  alarm: OverfitAlarm, how: Execution, record: Callable[[], None]) -> Trainer:
    t = cfg.train
    # the writer creates its event file as it is made: on rank 0 alone
    writer = SummaryWriter(str(run.tensorboard)) if "tensorboard" in t.trackers and backend.world.main else None
    pick = held_out if t.method == "sft" else held_out_pairs
    samples = pick(data.eval.dataset, tokenizer, t.sample_prompts) if data.eval and t.sample_prompts else []
    callbacks = [RunRecord(record), TrackerRecord(t.trackers, run, writer), MetricsFile(run.metrics),
                 SampleAnswers(samples, t.sample_max_new_tokens, run.metrics, t.trackers, writer,
                               unsloth=backend.unsloth is not None),
                 alarm, MarkComplete(t.save_total_limit)]
    if writer is not None:
        callbacks.append(TensorBoardCallback(tb_writer=writer))
    if t.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(t.early_stopping_patience, t.early_stopping_threshold))
    args = sft_config(cfg, backend, run, how) if t.method == "sft" else preference_config(cfg, backend, run, how)
    common = dict(model=model, args=args, processing_class=tokenizer, train_dataset=data.train.dataset,
                  eval_dataset=data.eval.dataset if data.eval else None, callbacks=callbacks)
    if t.method != "sft":
        trainer = _preference_trainer(t.method, backend, model, common)
    elif backend.name == "hf" and not backend.device.cuda:
        # TRL's loss runs a Triton kernel (its fused LM head) that needs a GPU; on CPU the HF backend trains the
        # same tokenized, masked examples with transformers' Trainer (Unsloth's CPU path patches TRL itself).
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        trainer = Trainer(data_collator=collator, **common)
    else:
        trainer = SFTTrainer(**common)
    if backend.precision == "fp16":  # TRL casts QLoRA adapters to bf16; fp16 loss scaling needs fp32 masters
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return trainer


def _preference_trainer(method: str, backend: Backend, model, common: dict) -> Trainer:
    """TRL's DPOTrainer (Unsloth's patched one on CUDA) or ORPOTrainer, on the PEFT model. DPO's reference is the
    base with the adapter disabled: TRL, given a PeftModel and no reference, adds a frozen copy of the fresh
    adapter ("ref", whose LoRA B is zero: the base itself), which is removed here, so that TRL disables the
    adapter for the reference forward and no copy is trained around or saved."""
    if backend.unsloth is not None and backend.device.cuda:
        backend.unsloth.PatchDPOTrainer()
    trainer = (_ORPOTrainer if method == "orpo" else DPOTrainer)(**common)
    if method == "dpo" and "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")
    return trainer


class _ORPOTrainer(ORPOTrainer):
    """TRL's ORPOTrainer, counting its tokens: its batches hold chosen_* and rejected_* rows and no input_ids, so
    transformers' count (the run's tokens and tokens/s) would stay 0."""

    def _track_num_input_tokens(self, inputs):
        if self.args.include_num_input_tokens_seen == "no" or "chosen_input_ids" not in inputs:
            return super()._track_num_input_tokens(inputs)
        key = "attention_mask" if self.args.include_num_input_tokens_seen == "non_padding" else "input_ids"
        rows = [inputs[f"{side}_{key}"] for side in ("chosen", "rejected")]  # each holds the prompt too
        n = sum(int(r.sum()) if key == "attention_mask" else r.numel() for r in rows)
        count = torch.as_tensor(n, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(count).sum().item()


def train(cfg: Config, backend: Backend, tokenizer, data: TrainingData, run: RunDir, base: str,
          resume: Optional[Path], how: Execution, record: Callable[[], None]) -> Trained:
    """Load `base` with LoRA and train it on `data` as `how` resolved, from `resume` when given; `record` writes
    the run's record when training really starts (kit.run.rundir.begin)."""
    budget, card = cfg.model.gpu_memory_gib, backend.device.memory_gib
    if budget and card and budget < card:  # stand in for a smaller card: the allocator refuses beyond the budget
        torch.cuda.set_per_process_memory_fraction(budget / card)
    if how.memory is not None and not how.memory.fits:
        log.warning(f"the run may not fit model.gpu_memory_gib: {how.memory.render()}")
    if not how.host_fits:
        log.warning(f"the run may not fit this machine's memory: {how.memory.estimate.render_host(how.host_gib)}")
    model = load_model(cfg, base, backend, checkpointing=bool(how.checkpointing), tiled_mlp=how.tiled_mlp,
                       kept_layers=how.kept_layers)
    alarm = OverfitAlarm(cfg.train.overfit_patience)
    trainer = build_trainer(cfg, backend, model, tokenizer, data, run, alarm, how, record)
    used = kernels(backend, how.padding_free, fused_head=isinstance(trainer, (SFTTrainer, DPOTrainer)))
    log.info(f"attention: {used.attention}; loss: {used.loss}")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the training peak, not the load's
    start = time.time()
    seen = tokens_seen(resume)  # now: rotation removes the resumed checkpoint once a newer one is complete
    with trackers.recording(cfg.train.trackers, run, backend.world.main):
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.time() - start
    host_peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if torch.cuda.is_available():
        peak_gib, peak_kind = torch.cuda.max_memory_allocated() / 2**30, "GPU, allocated"
    else:
        peak_gib, peak_kind = host_peak_gib, "process RSS"
    preference = None
    if cfg.train.method != "sft" and data.eval is not None and backend.world.main:
        preference = preference_accuracy(trainer.model, tokenizer, data.eval.dataset, cfg.train.method)
        log.info(f"held-out preference accuracy {preference['accuracy']:.3f} over {preference['pairs']} pairs "
                 f"(start: 0; raw log-probs prefer chosen: base {preference['base_logprob_accuracy']:.3f}, trained "
                 f"{preference['policy_logprob_accuracy']:.3f})")
    return Trained(model=trainer.model, steps=trainer.state.global_step, seconds=seconds,
                   tokens=trainer.state.num_input_tokens_seen - seen, alarms=alarm.alarms,
                   peak_gib=peak_gib, peak_kind=peak_kind, kernels=used, host_peak_gib=host_peak_gib,
                   preference=preference)
