"""Peak GPU memory of a LoRA / QLoRA run, estimated before any weights load, and the choice it drives:
gradient checkpointing off when the largest micro-batch fits the budget without it (no recompute, the
fastest), on when only that fits.

What is counted (bytes; h hidden size, i intermediate size, L layers, T padded tokens of the largest
micro-batch):
- frozen weights: the linear layers in 4-bit NF4 (0.5 byte a parameter plus 1/64 for the block scales),
  FP8 (1 byte; a scale a row) or 16-bit; embeddings, LM head and norms in 16-bit;
- LoRA: each trainable parameter with its gradient and the two AdamW moments, 16 bytes (4 with an 8-bit
  optimizer's moments);
- activations: without checkpointing 2 * (8h + 2i) bytes a token a layer (the inputs saved for the
  backward of the attention and MLP projections); with Unsloth's checkpointing the layers' inputs wait in CPU
  memory (its offloaded variant), so the GPU holds one layer's working set while it is recomputed,
  2 * (8h + 2i) + 15h bytes a token whatever the depth, and 0.25 GiB of buffers besides. The 15h and the
  0.25 GiB are fitted to the recipe's peaks from 2,499 to 65,536 tokens a micro-batch (docs/benchmarks.md);
  the depth-free form is what lets a long example fit, where 2h a token a layer would refuse it;
- with k layers kept out of the recompute (Unsloth's checkpoint_skip_layers, spread over the depth, the last
  layer among them): the k hold 2 * (8h + 2i) bytes a token each when the backward starts, and while a
  recomputed layer runs, its working set and the at most k - 1 kept below it; so k layers in place of the one
  recomputed layer's working set (k >= 1); 5-7% above the recipe's peaks with 3 and 7 layers kept, nothing fitted;
- with Unsloth's tiled MLP on top (train.tiled_mlp) the MLP's gate and up values (2 * 2i bytes a token) exist
  for one tile of h rows at a time, so a token costs 2 * 8h + 15h bytes and the tile 4hi; nothing fitted anew:
  within 2.5% of the recipe's peaks at 32,768-131,072 tokens (docs/benchmarks.md);
- the loss: the fused, chunked cross-entropy holds one tile of at most 4,096 rows x 16,384 vocabulary
  columns in fp32, never the full logits;
- DPO's reference forward (train.method=dpo): TRL runs it after the policy's forward, under no_grad, while the
  policy's activations wait for the backward; it keeps nothing across layers, so it adds one layer's working
  set for the micro-batch (the per-layer figure above) and a loss tile. ORPO has no reference: no such term.
  A preference pair's chosen and rejected rows are both in the micro-batch's tokens (kit.train.plan).
- host memory: Unsloth's offloaded checkpointing copies each recomputed layer's input (2h bytes a token) into a
  pinned CPU buffer of its own (the first pass offloads every one) and keeps the buffers for the next steps
  (unsloth_zoo's gradient_checkpointing, read there, not measured); pinned memory cannot be swapped out, so the
  machine's RAM bounds it: 32 GiB at 131,072 tokens for Llama 3.1 8B.
On an H200 and an H100 these land within a few percent of torch.cuda.max_memory_allocated for
Llama-3.1-8B QLoRA r=16 (docs/benchmarks.md). The CUDA context and the allocator's slack are outside it:
a budget keeps RESERVE (15%) of it for them.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from huggingface_hub import try_to_load_from_cache

from kit.config.model import RANDOM
from kit.core.errors import KitError
from kit.models.gguf_source import is_gguf_source, materialize
from kit.models.hub import base_config
from kit.models.llama import MAX_POSITIONS, VOCAB_SIZE, context_cap, projection_shapes
from kit.models.tiny import SHAPES

GIB = 2**30
# Hub names of Llama 3.1 8B (base, instruct, Unsloth's copies): the 8b shape of kit.models.tiny, no download needed
LLAMA31_8B_NAMES = {"llama-3.1-8b", "llama-3.1-8b-instruct", "meta-llama-3.1-8b", "meta-llama-3.1-8b-instruct"}
RESERVE = 0.15   # of a budget: the caching allocator's unused reserved blocks count against a capped process
# (an 8 GiB run planned at 7.2 GiB ran out with 7.76 allocated + 0.24 reserved, docs/benchmarks.md)
LOSS_TILE_ROWS, LOSS_TILE_COLS = 4096, 16384
RECOMPUTE_HIDDEN_BYTES = 15   # a token, per hidden unit, beside the recomputed layer's working set (fitted)
RECOMPUTE_BUFFERS_GIB = 0.25  # with checkpointing, whatever the length (fitted)
LINEAR_BYTES = {"nf4": 0.5 + 1 / 64, "fp8": 1, "16-bit": 2}  # a parameter, by ModelConfig.quantization
LORA_BYTES = {"adamw_torch": 16, "adafactor": 12, "adamw_8bit": 10, "paged_adamw_8bit": 10,
              "paged_adamw_32bit": 16}


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float
    lora_gib: float
    activations_gib: float
    loss_gib: float
    tokens: int
    """Padded tokens of the largest micro-batch the estimate is for."""
    checkpointing: bool
    reference_gib: float = 0.0
    """DPO's reference forward (0: SFT, ORPO)."""
    tiled_mlp: bool = False
    layers: int = 0
    """The model's decoder layers."""
    kept_layers: int = 0
    """With checkpointing: the layers that keep their activations, not recomputed (0: every layer recomputed)."""
    host_gib: float = 0.0
    """Pinned CPU memory for the offloaded checkpoints (0 without checkpointing); not in total_gib."""

    @property
    def recompute(self) -> str:
        """Checkpointing as estimated: "on", "on for 25 of 32 layers", "on, MLP tiled", "off"."""
        if not self.checkpointing:
            return "off"
        part = f" for {self.layers - self.kept_layers} of {self.layers} layers" if self.kept_layers else ""
        return f"on{part}{', MLP tiled' if self.tiled_mlp else ''}"

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.lora_gib + self.activations_gib + self.loss_gib + self.reference_gib

    def render(self) -> str:
        reference = f" + reference forward {self.reference_gib:.1f}" if self.reference_gib else ""
        return (f"{self.total_gib:.1f} GiB = weights {self.weights_gib:.1f} + LoRA and optimizer "
                f"{self.lora_gib:.1f} + activations {self.activations_gib:.1f} ({self.tokens:,} tokens, "
                f"checkpointing {self.recompute}) "
                f"+ loss {self.loss_gib:.1f}{reference}")

    def render_host(self, machine_gib: Optional[float]) -> str:
        """The offloaded checkpoints' pinned CPU memory, against `machine_gib` (this machine's; None: unknown)."""
        text = f"~{self.host_gib:.1f} GiB pinned for the offloaded checkpoints"
        if machine_gib is None:
            return text
        if self.host_gib <= machine_gib:
            return f"{text}; this machine has {machine_gib:.0f} GiB"
        return (f"{text}. DOES NOT FIT this machine's {machine_gib:.0f} GiB: lower model.max_seq_length, give "
                "model.gpu_memory_gib more room (fewer layers recomputed), or use a machine with more memory")


def weights_gib(model: dict, linear_bytes: float) -> float:
    """The model's weights: its linear layers at `linear_bytes` a parameter, embeddings and head in 16-bit."""
    linear = sum(a * b for a, b in projection_shapes(model).values()) * model["num_hidden_layers"]
    embeddings = model["vocab_size"] * model["hidden_size"] * (1 if model.get("tie_word_embeddings") else 2)
    return (linear * linear_bytes + embeddings * 2) / GIB


def estimate(model: dict, *, quantization: str, lora_r: int, targets: list[str], optim: str, tokens: int,
             checkpointing: bool, reference: bool = False, tiled_mlp: bool = False,
             kept_layers: int = 0) -> MemoryEstimate:
    """`model`: the base model's config.json; `reference`: a reference forward runs beside the policy's (DPO);
    `tiled_mlp` and `kept_layers` (layers not recomputed; the MLP whole) count only with `checkpointing`."""
    h, i, vocab = model["hidden_size"], model["intermediate_size"], model["vocab_size"]
    layers = model["num_hidden_layers"]
    proj = projection_shapes(model)
    weights = weights_gib(model, LINEAR_BYTES[quantization]) * GIB
    lora = sum(lora_r * sum(proj[t]) for t in targets) * layers * LORA_BYTES[optim]
    layer = 2 * (8 * h + 2 * i)  # a token: one layer's inputs saved for its backward
    tiled_mlp = tiled_mlp and checkpointing
    kept_layers = kept_layers if checkpointing and not tiled_mlp else 0
    if checkpointing:
        # tiled: the MLP's gate and up values exist for one tile (Unsloth's "arctic" tiles: h rows) at a time
        working, tile = (16 * h, min(tokens, h) * 2 * (2 * i)) if tiled_mlp else (layer * max(kept_layers, 1), 0)
        activations = (working + RECOMPUTE_HIDDEN_BYTES * h) * tokens + tile + RECOMPUTE_BUFFERS_GIB * GIB
    else:
        activations = layer * layers * tokens
    loss = min(tokens, LOSS_TILE_ROWS) * min(vocab, LOSS_TILE_COLS) * 4
    ref = (layer * tokens + loss) if reference else 0  # one layer at a time (untiled: at most), its own loss tile
    offloaded = layers - kept_layers if checkpointing else 0
    return MemoryEstimate(weights_gib=weights / GIB, lora_gib=lora / GIB, activations_gib=activations / GIB,
                          loss_gib=loss / GIB, tokens=tokens, checkpointing=checkpointing, reference_gib=ref / GIB,
                          tiled_mlp=tiled_mlp, layers=layers, kept_layers=kept_layers,
                          host_gib=offloaded * 2 * h * tokens / GIB)


def max_context(model: dict, budget_gib: float, *, pairs: bool, **kw) -> tuple[int, MemoryEstimate]:
    """The longest example (tokens; a preference pair: each of its two rows) that fits `budget_gib` alone in its
    micro-batch with checkpointing (and `tiled_mlp` as given), capped by context_cap(model), and the estimate
    there; 0 when none fits."""
    rows = 2 if pairs else 1
    def at(tokens: int) -> MemoryEstimate:
        return estimate(model, checkpointing=True, tokens=rows * tokens, **kw)
    lo, hi = 0, context_cap(model)
    while lo < hi:  # the estimate grows with the tokens
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if at(mid).total_gib <= usable(budget_gib) else (lo, mid - 1)
    return lo, at(max(lo, 1))


@dataclass(frozen=True)
class MemoryChoice:
    checkpointing: Optional[bool]
    """None: left to the GPU the run starts on (no budget known yet)."""
    without: MemoryEstimate
    with_: MemoryEstimate
    budget_gib: Optional[float]
    reason: str

    @property
    def estimate(self) -> MemoryEstimate:
        return self.with_ if self.checkpointing else self.without

    @property
    def fits(self) -> bool:
        return self.budget_gib is None or self.estimate.total_gib <= usable(self.budget_gib)

    def render(self) -> str:
        other = self.without if self.checkpointing else self.with_
        text = f"~{self.estimate.render()}; with checkpointing {'off' if self.checkpointing else 'on'}: " \
               f"~{other.total_gib:.1f} GiB"
        if self.budget_gib is None:
            return text + "; set model.gpu_memory_gib to plan for your card"
        fit = "" if self.fits else ". DOES NOT FIT: lower model.max_seq_length or lora.r, or use a larger GPU"
        return f"{text}; budget {self.budget_gib:g} GiB{fit}"


def usable(budget_gib: float) -> float:
    return budget_gib * (1 - RESERVE)


def choose(model: dict, budget_gib: Optional[float], requested: Optional[bool], tiled: Optional[bool] = None,
           **kw) -> MemoryChoice:
    """Checkpointing and the tiled MLP as requested, or (None: 'auto') the fastest that fits the budget: no
    recompute, else recompute for as few layers as fit (the others keep their activations), else for all of
    them with the MLP tiled."""
    without = estimate(model, checkpointing=False, **kw)
    whole = estimate(model, checkpointing=True, **kw)
    tiles = estimate(model, checkpointing=True, tiled_mlp=True, **kw)
    def fits(e: MemoryEstimate) -> bool:
        return budget_gib is None or e.total_gib <= usable(budget_gib)
    with_ = (whole if fits(whole) else tiles) if tiled is None else (tiles if tiled else whole)
    if requested is not None:
        return MemoryChoice(requested, without, with_, budget_gib, "set by train.gradient_checkpointing")
    if tiled:  # the tiles live inside recomputed layers
        return MemoryChoice(True, without, with_, budget_gib, "set by train.tiled_mlp=true")
    if budget_gib is None:
        return MemoryChoice(None, without, with_, None, "auto: decided by the GPU's memory when training starts")
    if fits(without):
        return MemoryChoice(False, without, with_, budget_gib, f"auto: fits {budget_gib:g} GiB without recompute")
    limit = f"{usable(budget_gib):.1f} of {budget_gib:g} GiB"
    partial = next((e for k in range(whole.layers - 1, 0, -1)
                    if fits(e := estimate(model, checkpointing=True, kept_layers=k, **kw))), None)
    if partial is not None and not with_.tiled_mlp:
        return MemoryChoice(True, without, partial, budget_gib, f"auto: without it ~{without.total_gib:.1f} GiB "
                            f"exceeds {limit}; {partial.kept_layers} layer{'s' * (partial.kept_layers > 1)} "
                            "fit without recompute")
    if with_.tiled_mlp and tiled is None:
        return MemoryChoice(True, without, with_, budget_gib, f"auto: without it ~{without.total_gib:.1f} GiB, with "
                            f"it and the MLP whole ~{whole.total_gib:.1f} GiB exceed {limit}: the MLP tiled")
    return MemoryChoice(True, without, with_, budget_gib,
                        f"auto: without it ~{without.total_gib:.1f} GiB exceeds {limit}")


def largest_micro_batch(lengths: list[int], *, sampling: str, padding_free: bool, batch: int, grad_accum: int,
                        devices: int, steps: int) -> tuple[int, bool]:
    """(tokens of the largest micro-batch any device trains, exact): padded (rows x longest) or, padding-free,
    their sum. transformers' batch_rebalance sampler decides its batches from the lengths alone, so its own
    sampler is run over the planned steps; for the other strategies it is the worst case the data allows."""
    def size(micro: list[int]) -> int:
        return sum(micro) if padding_free else len(micro) * max(micro)

    if sampling == "batch_rebalance":
        from transformers.trainer_pt_utils import BatchRebalanceSampler
        worst = 0
        for rank in range(devices):  # every rank's share: the largest decides each GPU's budget
            sampler = BatchRebalanceSampler(lengths=lengths, effective_batch_size=batch * grad_accum * devices,
                                            dp_size=devices, grad_accum=grad_accum, rank=rank, drop_last=False)
            left, epoch = steps * grad_accum, 0
            while left > 0:
                sampler.set_epoch(epoch)
                for micro in itertools.islice(sampler, left):
                    worst = max(worst, size([lengths[i] for i in micro]))
                    left -= 1
                epoch += 1
        return worst, True
    return size(sorted(lengths, reverse=True)[:batch]), False


def base_model_config(name: str, network: bool) -> Optional[dict]:
    """config.json of the base model: a random shape, a Llama 3.1 8B Hub id (its shape is the kit's 8b one),
    a local folder, the Hub's cache, or (network=True) the Hub; None when it cannot be had."""
    if name.startswith(RANDOM):
        return _shape(name[len(RANDOM):])
    if is_gguf_source(name):  # the folder it was dequantized to, once
        name = str(materialize(name))
    if name.lower().removesuffix("-bnb-4bit").split("/")[-1] in LLAMA31_8B_NAMES:
        return _shape("8b")
    cached = try_to_load_from_cache(name, "config.json") if not Path(name).exists() else None
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    if not network and not Path(name).is_dir():
        return None
    try:
        return base_config(name)
    except KitError:
        return None


def _shape(shape: str) -> dict:
    return {**SHAPES[shape], "vocab_size": VOCAB_SIZE, "tie_word_embeddings": False,
            "max_position_embeddings": MAX_POSITIONS, "rope_scaling": {"rope_type": "llama3"}}
