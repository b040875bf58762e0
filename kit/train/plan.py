"""Step arithmetic of a run, as the guide explains it and as Hugging Face's Trainer counts.

examples / (batch x accumulation x devices) = steps per epoch; 2400 / (8 x 4) = 75, so a run of
3 epochs saving each epoch writes checkpoint-75, checkpoint-150, checkpoint-225. On 2 devices (DDP) each
step trains 64 examples: 2400 / 64 = 37.5, and the last, partial step counts, so 38.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from kit.config.schema import Config
from kit.config.train import MAX_STEPS
from kit.core.errors import ConfigError
from kit.models.llama import ROPE_STRETCH, context_cap, positions, widens
from kit.run.rundir import checkpoint_name
from kit.train.memory import MemoryChoice, base_model_config, choose, largest_micro_batch, max_context, usable


@dataclass
class Execution:
    """How the steps run on this machine: the kit's answer to the settings left at auto."""
    sampling: str
    """transformers' train_sampling_strategy: how examples form micro-batches."""
    batch: int
    grad_accum: int
    """The micro-batch split of each optimizer step: train.per_device_train_batch_size and
    gradient_accumulation_steps, or a finer split of the same effective batch when only that fits the budget."""
    padding_free: bool
    checkpointing: Optional[bool]
    """None: decided by the GPU's memory when training starts (a plan made without one)."""
    largest_micro_batch: int
    """Padded tokens of the largest micro-batch one device trains (the memory peak's driver)."""
    exact: bool
    """largest_micro_batch is what the sampler will yield (True) or a worst case (False)."""
    memory: Optional[MemoryChoice] = None
    """The GPU memory estimate and budget (None on CPU, or when the model's shape is unknown)."""
    tiled_mlp: bool = False
    """Unsloth's tiled MLP (train.tiled_mlp as resolved)."""
    host_gib: Optional[float] = None
    """The memory of the machine the plan is for (None: not known), which holds the offloaded checkpoints."""

    @property
    def kept_layers(self) -> int:
        """With checkpointing: the decoder layers that keep their activations (kit.train.memory.choose)."""
        return self.memory.estimate.kept_layers if self.memory is not None and self.checkpointing else 0

    @property
    def recompute(self) -> str:
        """Gradient checkpointing as resolved, with the tiled MLP: "on for 25 of 32 layers", "off", "auto"."""
        if self.memory is not None and self.checkpointing is not None:
            return self.memory.estimate.recompute
        return {None: "auto", True: "on", False: "off"}[self.checkpointing] + (", MLP tiled" if self.tiled_mlp else "")

    @property
    def host_fits(self) -> bool:
        """The offloaded checkpoints fit the machine's memory (or either is unknown)."""
        return self.memory is None or self.host_gib is None or self.memory.estimate.host_gib <= self.host_gib

    def rows(self) -> list[tuple[str, str]]:
        batches = f"{self.batch} x {self.grad_accum}, {self.sampling}, " \
                  f"{'padding-free' if self.padding_free else 'padded'}; largest {self.largest_micro_batch:,} " \
                  f"tokens{'' if self.exact else ' at most'}"
        setting = self.recompute
        if self.memory is None:
            return [("micro-batches", batches), ("gradient checkpointing", setting)]
        host = self.memory.estimate.host_gib
        return [("micro-batches", batches), ("gradient checkpointing", f"{setting} ({self.memory.reason})"),
                ("GPU memory", self.memory.render())] + \
            ([("host memory", self.memory.estimate.render_host(self.host_gib))] if host else [])


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
    execution: Optional[Execution] = None
    as_one_device: Optional[str] = None
    """With several devices: the overrides that keep one device's effective batch ("" when none split it evenly)."""

    def render(self) -> str:
        def few(items):
            return ", ".join(map(str, items[:6])) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")
        rows = [
            ("training examples", f"{self.examples:,}"),
            ("eval examples", f"{self.eval_examples:,}"),
            ("effective batch", f"{self.effective_batch} (batch x accumulation x {self.devices} device(s))"),
        ] + ([("as on 1 device", self._as_one_device())] if self.devices > 1 else []) + [
            ("steps per epoch", f"{self.steps_per_epoch:,}"),
            ("epochs", f"{self.epochs:g}"),
            ("total steps", f"{self.total_steps:,}"),
            ("warmup steps", f"{self.warmup_steps:,}"),
            ("evaluations at steps", few(self.eval_at) or "none"),
            ("checkpoints", few(self.checkpoints) or "none"),
            ("tokens per step", f"at most {self.max_tokens_per_step:,}"
             + (f", about {self.mean_tokens_per_step:,.0f} with this data" if self.mean_tokens_per_step else "")),
        ] + (self.execution.rows() if self.execution else [])
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)

    def _as_one_device(self) -> str:
        one = self.effective_batch // self.devices
        if not self.as_one_device:
            return f"effective batch {one} does not split evenly over {self.devices} devices"
        return f"effective batch {one} with {self.as_one_device}"


def make_plan(cfg: Config, examples: int, eval_examples: int = 0, devices: int = 1,
              mean_tokens_per_example: Optional[float] = None, execution: Optional[Execution] = None) -> Plan:
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
    if total > MAX_STEPS:  # checked before the schedules below are listed
        raise ConfigError(f"train: {epochs:g} epochs of {steps_per_epoch:,} steps make {total:,} optimizer steps; the "
                          f"kit plans at most {MAX_STEPS:,}. Lower train.num_train_epochs or set train.max_steps.")
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
    rows = 1 if t.method == "sft" else 2  # a preference pair trains as two rows: prompt + chosen, prompt + rejected
    return Plan(examples=examples, eval_examples=eval_examples, devices=devices, effective_batch=per_step,
                steps_per_epoch=steps_per_epoch, total_steps=total, epochs=epochs, warmup_steps=warmup,
                eval_at=eval_at, checkpoints=[checkpoint_name(s) for s in save_at],
                max_tokens_per_step=per_step * rows * cfg.model.max_seq_length, mean_tokens_per_step=mean_tokens,
                execution=execution, as_one_device=as_one_device(cfg, devices) if devices > 1 else None)


def as_one_device(cfg: Config, devices: int) -> str:
    """The overrides that train one device's effective batch on `devices`: fewer accumulation steps first (the
    batch per pass is what keeps a GPU busy), then a smaller batch; "" when it does not split evenly."""
    batch, accum = cfg.train.per_device_train_batch_size, cfg.train.gradient_accumulation_steps
    if (batch * accum) % devices:
        return ""
    share = batch * accum // devices
    new_batch = max(k for k in range(1, batch + 1) if share % k == 0)
    changes = [("per_device_train_batch_size", new_batch, batch),
               ("gradient_accumulation_steps", share // new_batch, accum)]
    return " ".join(f"train.{key}={new}" for key, new, old in changes if new != old)


def execution(cfg: Config, lengths: Optional[list[int]], *, cuda: bool, card_gib: Optional[float], steps: int,
              devices: int = 1, host_gib: Optional[float] = None) -> Execution:
    """Resolve padding, sampling, checkpointing and the micro-batch split for this machine: the fastest that
    fits the GPU memory budget. `lengths`: the training examples' token counts (None: a plan without data,
    sized for the worst case); `card_gib`: the GPU's memory (None: no GPU known); `host_gib`: the machine's.

    Measured (docs/benchmarks.md): padding-free steps pay a host cost per pass (with torch 2.11 Unsloth attends
    example by example; 2.12's varlen kernel makes that cost smaller), so a step's examples go in as few passes
    as fit; recompute cost less than more passes under torch 2.11, so checkpointing comes before a finer split.
    Padded batches are only ever split finer."""
    t, m = cfg.train, cfg.model
    pairs = t.method != "sft"  # TRL pads preference pairs (its padding-free DPO is disabled), two rows a pair
    unsloth_cuda = cuda and m.backend != "hf"
    padding_free = not pairs and (t.packing or (unsloth_cuda if t.padding_free == "auto" else t.padding_free))
    sampling = t.train_sampling_strategy
    if sampling == "auto":  # on CUDA every micro-batch is known in advance; on CPU the guide's random batches
        sampling = "batch_rebalance" if cuda and not t.packing and not pairs else "random"
    requested = None if t.gradient_checkpointing == "auto" else t.gradient_checkpointing
    tiled = None if t.tiled_mlp == "auto" and unsloth_cuda else t.tiled_mlp is True
    # the estimate is calibrated on Unsloth's kernels: the hf backend keeps checkpointing unless told otherwise
    estimable = m.backend != "hf" and (cuda or lengths is None)
    model = base_model_config(m.name, network=lengths is not None) if estimable else None
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps
    if padding_free and not t.packing and model is not None:
        splits = [(per_step // k, k) for k in (2**i for i in range(per_step.bit_length())) if per_step % k == 0]
    else:
        splits = [(t.per_device_train_batch_size // k, t.gradient_accumulation_steps * k)
                  for k in (2**i for i in range(t.per_device_train_batch_size.bit_length()))
                  if t.per_device_train_batch_size % k == 0]
    for batch, accum in splits:
        if lengths is None or t.packing:
            largest, exact = (batch * m.max_seq_length * (2 if pairs else 1)), False
        else:
            largest, exact = largest_micro_batch(lengths, sampling=sampling, padding_free=padding_free, batch=batch,
                                                 grad_accum=accum, devices=devices, steps=steps)
        if model is None:
            checkpointing = requested if requested is not None else cuda  # shape unknown: the safe choice
            return Execution(sampling, batch, accum, padding_free, checkpointing, largest, exact,
                             tiled_mlp=bool(tiled and checkpointing), host_gib=host_gib)
        memory = choose(model, m.gpu_memory_gib or card_gib, requested, tiled, quantization=m.quantization,
                        lora_r=cfg.lora.r, targets=cfg.target_modules, optim=t.optim, tokens=largest,
                        reference=t.method == "dpo")
        if memory.fits:
            break
    return Execution(sampling, batch, accum, padding_free, memory.checkpointing, largest, exact, memory,
                     tiled_mlp=memory.estimate.tiled_mlp, host_gib=host_gib)


def check_context(cfg: Config) -> None:
    """model.max_seq_length within the positions the base trains on (kit.models.llama.context_cap), before any
    weights load; a base whose config.json cannot be read here is left to the loader."""
    m = cfg.model
    model = base_model_config(m.name, network=True)
    if model is None or m.max_seq_length <= context_cap(model):
        return
    if widens(model):
        raise ConfigError(f"model.max_seq_length={m.max_seq_length}: past {ROPE_STRETCH} times the "
                          f"{positions(model):,} positions of {m.name}, the longest the kit trains it on. Use "
                          f"model.max_seq_length={context_cap(model)} or less.")
    raise ConfigError(f"model.max_seq_length={m.max_seq_length}: past the {positions(model):,} positions of {m.name} "
                      "(max_position_embeddings in its config.json). Its RoPE would be stretched for training only "
                      "(Unsloth stretches it linearly), and the adapter would not fit the base as exported and "
                      f"served. Use model.max_seq_length={positions(model)} or less.")


def longest_example(cfg: Config, card_gib: Optional[float], host_gib: Optional[float] = None) -> str:
    """--plan --max-context: how long one example can be at the memory budget (model.gpu_memory_gib, else the card's
    `card_gib`), alone in its micro-batch with checkpointing, as the estimate of kit.train.memory counts it, and the
    host memory its offloaded checkpoints take (`host_gib`: this machine's)."""
    m, t = cfg.model, cfg.train
    budget = m.gpu_memory_gib or card_gib
    if budget is None:
        raise ConfigError("--max-context: no GPU here to size for; set model.gpu_memory_gib to the GiB of the card "
                          "you will train on (e.g. model.gpu_memory_gib=24).")
    if m.backend == "hf":
        raise ConfigError("--max-context: the memory estimate is for the Unsloth backend's kernels; "
                          "use model.backend=unsloth.")
    model = base_model_config(m.name, network=True)
    if model is None:
        raise ConfigError(f"model.name={m.name}: its config.json cannot be read here, so its memory cannot be "
                          "estimated; give a model folder, a GGUF file or a Hub id this machine can reach.")
    kw = dict(pairs=t.method != "sft", quantization=m.quantization, lora_r=cfg.lora.r, targets=cfg.target_modules,
              optim=t.optim, reference=t.method == "dpo")
    tokens, at = max_context(model, budget, tiled_mlp=False, **kw)
    whole = ""
    if t.tiled_mlp is not False:  # longer with the MLP tiled, where it allows more
        tiled_tokens, tiled_at = max_context(model, budget, tiled_mlp=True, **kw)
        if tiled_tokens > tokens:
            whole = f"; {tokens:,} with the MLP whole"
            tokens, at = tiled_tokens, tiled_at
    if tokens == 0:
        raise ConfigError(f"model.gpu_memory_gib={budget:g}: not even a one-token example fits "
                          f"({usable(budget):.1f} GiB usable, ~{at.total_gib:.1f} GiB needed); use a larger GPU"
                          + ("" if m.quantization == "nf4" else
                             ", model.load_in_4bit=true model.load_in_fp8=false (QLoRA)")
                          + " or a smaller lora.r.")
    what = "pair (each of its two rows)" if t.method != "sft" else "example"
    cap = " (the longest model.max_seq_length for this base; the memory would allow more)" \
        if tokens == context_cap(model) else ""
    past = f"; past the base's {positions(model):,} positions, its llama3 RoPE as it is" \
        if tokens > positions(model) else ""
    return (f"longest {what} at {budget:g} GiB: {tokens:,} tokens{cap}{whole}{past}\n"
            f"  GPU memory   ~{at.render()}; usable {usable(budget):.1f} of {budget:g} GiB\n"
            f"  host memory  {at.render_host(host_gib)}\n"
            f"  train with   model.max_seq_length={tokens} train.per_device_train_batch_size=1 "
            "train.gradient_checkpointing=true" + (" train.tiled_mlp=true" if at.tiled_mlp else ""))
