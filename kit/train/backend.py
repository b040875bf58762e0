"""The training backend: the device, the precision, and Unsloth or transformers + PEFT.

The import boundary: Unsloth patches transformers, TRL and PEFT when it is imported, so it must come
first. activate() is the kit's one import of Unsloth; the recipe's steps call it before they import
kit.train.trainer, which (with kit.train.model and kit.train.callbacks) imports torch, transformers, TRL and PEFT
at its top. No other kit module imports them at import time.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal, Optional

from kit.config.schema import Config, check_device, check_processes
from kit.train.distributed import ALONE, World, join

log = logging.getLogger("kit")


@dataclass(frozen=True)
class Device:
    kind: Literal["cuda", "cpu"]
    name: str
    """e.g. "NVIDIA H100 80GB HBM3" or "cpu (2 threads)"."""
    bf16: bool
    """bf16 matmuls supported."""
    memory_gib: Optional[float] = None
    """The GPU's memory (None on CPU)."""
    fp8: bool = False
    """FP8 matmuls for Unsloth's FP8 training (compute capability 9.0, Hopper, or newer)."""
    host_gib: Optional[float] = None
    """This machine's memory: its RAM, or the container's limit where that is lower (None: not known)."""

    @property
    def cuda(self) -> bool:
        return self.kind == "cuda"


@dataclass(frozen=True)
class Backend:
    name: Literal["unsloth", "hf"]
    device: Device
    precision: Literal["bf16", "fp16", "fp32"]
    unsloth: Optional[ModuleType] = None
    """The imported unsloth package (backend unsloth only)."""
    world: World = ALONE
    """The processes training together (one without a launcher)."""

    @property
    def device_map(self) -> Optional[dict]:
        """Where this process loads its copy of the model: all of it on its own GPU."""
        return {"": self.world.local_rank} if self.device.cuda else None


def detect_device(index: int = 0) -> Device:
    """The device of this process: GPU `index` (its local rank) when there is CUDA."""
    import torch
    if torch.cuda.is_available():
        return Device("cuda", torch.cuda.get_device_name(index), torch.cuda.is_bf16_supported(),
                      torch.cuda.get_device_properties(index).total_memory / 2**30,
                      torch.cuda.get_device_capability(index) >= (9, 0), host_memory_gib())
    return Device("cpu", f"cpu ({torch.get_num_threads()} threads)", False, host_gib=host_memory_gib())


def host_memory_gib() -> Optional[float]:
    """This machine's RAM, or its cgroup v2 memory limit (a container's) where that is lower."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that counts its pages
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        limit = "max"
    return min(ram, int(limit)) / 2**30 if limit.isdigit() else ram / 2**30


def resolve_precision(setting: str, device: Device) -> str:
    p = setting
    if p == "auto":
        p = ("bf16" if device.bf16 else "fp16") if device.cuda else "fp32"
    if p == "fp32" and device.cuda:
        log.warning("precision fp32 on a GPU: about twice the memory and much slower than bf16; the guide "
                    "advises bf16 (fp16 with loss scaling where bf16 is missing).")
    return p


def check_machine(cfg: Config, world: World) -> Device:
    """This process's device, the settings checked against it and, for several processes on this machine (DDP),
    against its GPUs."""
    import torch
    if world.local_size > 1:
        check_processes(world.local_size, torch.cuda.device_count())
    device = detect_device(world.local_rank)
    check_device(cfg, device.cuda, device.bf16, device.fp8)
    return device


def activate(cfg: Config, world: World = ALONE) -> Backend:
    """Check the settings against this machine, join the other processes of `world` (every rank checks alike
    first, so that a problem stops each of them and none waits), then import Unsloth (backend auto/unsloth)
    before anything imports transformers or TRL."""
    device = check_machine(cfg, world)
    join(world)
    name = "unsloth" if cfg.model.backend == "auto" else cfg.model.backend
    precision = resolve_precision(cfg.model.precision, device)
    if name == "hf":
        return Backend(name, device, precision, world=world)
    import unsloth
    return Backend(name, device, precision, unsloth, world)


@dataclass(frozen=True)
class Kernels:
    """What computes attention and the loss in this run, read from the libraries as they resolved it."""
    attention: str
    loss: str


def kernels(backend: Backend, padding_free: bool, fused_head: bool) -> Kernels:
    """`fused_head`: TRL's SFTTrainer trains (its fused LM head computes the loss), not transformers' Trainer."""
    from importlib import import_module, metadata
    if backend.unsloth is None:
        attention = "PyTorch SDPA (transformers)"
    elif not backend.device.cuda:
        attention = "PyTorch SDPA (Unsloth's CPU path)"
    else:
        dispatch = import_module("unsloth.utils.attention_dispatch")
        if not padding_free:
            attention = f"{dispatch.select_attention_backend(use_varlen=False)} in Unsloth's compiled decoder blocks"
        elif getattr(dispatch, "HAS_FLASH_ATTENTION", False):
            attention = "flash-attn variable-length"
        elif getattr(dispatch, "_TORCH_VARLEN_ATTN", None) is not None:
            attention = "PyTorch varlen flash (torch.nn.attention.varlen)"
        elif getattr(dispatch, "HAS_XFORMERS", False):
            attention = "xformers block-diagonal"
        else:
            attention = "SDPA once per example (this torch's varlen attention has no GQA; torch >= 2.12 does)"
        try:
            xformers = metadata.version("xformers")
            if not getattr(dispatch, "HAS_XFORMERS", False):
                attention += f"; xformers {xformers} is installed but does not load with this torch"
        except metadata.PackageNotFoundError:
            pass
    if not fused_head:
        loss = "full logits (transformers' cross-entropy)"
    else:
        head = getattr(import_module("trl.trainer.utils"), "_ChunkedLogProbFunction", None)
        loss = ("Unsloth's fused linear log-probs in TRL's fused LM head (chunked, no full logits)"
                if getattr(head, "_unsloth_fused_linear", False) else "TRL's chunked fused LM head (no full logits)")
    return Kernels(attention, loss)
