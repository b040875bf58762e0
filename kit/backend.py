"""The training backend: the device, the precision, and Unsloth or transformers + PEFT.

The import boundary: Unsloth patches transformers, TRL and PEFT when it is imported, so it must come
first. activate() is the kit's one import of Unsloth; the recipe calls it before it imports kit.train,
which (with kit.model and kit.callbacks) imports torch, transformers, TRL and PEFT at its top. No other
kit module imports them at import time.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Literal, Optional

from kit.config import Config, check_device

log = logging.getLogger("kit")


@dataclass(frozen=True)
class Device:
    kind: Literal["cuda", "cpu"]
    name: str
    """e.g. "NVIDIA H100 80GB HBM3" or "cpu (2 threads)"."""
    bf16: bool
    """bf16 matmuls supported."""

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


def detect_device() -> Device:
    import torch
    if torch.cuda.is_available():
        return Device("cuda", torch.cuda.get_device_name(0), torch.cuda.is_bf16_supported())
    return Device("cpu", f"cpu ({torch.get_num_threads()} threads)", False)


def resolve_precision(setting: str, device: Device) -> str:
    p = setting
    if p == "auto":
        p = ("bf16" if device.bf16 else "fp16") if device.cuda else "fp32"
    if p == "fp32" and device.cuda:
        log.warning("precision fp32 on a GPU: about twice the memory and much slower than bf16; the guide "
                    "advises bf16 (fp16 with loss scaling where bf16 is missing).")
    return p


def activate(cfg: Config) -> Backend:
    """Check the settings against this machine, then import Unsloth (backend auto/unsloth) before anything
    imports transformers or TRL."""
    device = detect_device()
    check_device(cfg, device.cuda, device.bf16)
    name = "unsloth" if cfg.model.backend == "auto" else cfg.model.backend
    precision = resolve_precision(cfg.model.precision, device)
    if name == "hf":
        return Backend(name, device, precision)
    import unsloth
    return Backend(name, device, precision, unsloth)
