"""Training on several GPUs of one machine: data parallel (DDP) through torchrun and accelerate.

    kit train --devices 2 ...      torchrun --standalone --nproc_per_node 2 -m kit.recipes.llama31_sft ...

Each process (a rank) loads its own copy of the model, QLoRA included, and trains its share of every
optimizer step's examples; the Trainer (accelerate's DDP) averages the gradients. Every rank makes the same
decisions from the same config and data; rank 0 alone writes the run directory. Without a launcher the
world is one process and nothing here starts anything.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

from kit.core import env

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """The processes training one run, as the launcher started them."""
    size: int = 1
    rank: int = 0
    local_rank: int = 0
    """This process's GPU on its machine."""
    local_size: int = 1
    """The processes on this machine: each needs a GPU of its own."""

    @property
    def main(self) -> bool:
        """Rank 0: prints the plan and writes the run directory, the metrics, checkpoints and the adapter."""
        return self.rank == 0


ALONE = World()  # a process started without a launcher


def world() -> World:
    return World(env.world_size(), env.rank(), env.local_rank(), env.local_world_size())


def join(w: World) -> None:
    """Join the other ranks (the process group: NCCL on GPUs, gloo on CPU, as accelerate picks it, each rank on
    its own GPU). The Trainer's arguments find and use this group."""
    if w.size > 1:
        import torch
        from accelerate import PartialState
        cuda = torch.cuda.is_available()
        PartialState(cpu=not cuda)
        if not cuda:
            _load_cpu_ranks_on_cpu()


def _load_cpu_ranks_on_cpu() -> None:
    """accelerate names a CPU rank's device cpu:0, and the Trainer loads a resumed optimizer state onto it
    (map_location), a location torch's loader does not know (it knows "cpu"): it is the CPU."""
    import torch.serialization
    torch.serialization.register_package(
        11, lambda storage: None, lambda storage, location: storage if location.startswith("cpu:") else None)


def leave(w: World) -> None:
    if w.size > 1:
        import torch.distributed
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def on_main(w: World, fn: Callable[..., T], *args) -> T:
    """fn(*args) on rank 0 alone (it creates the run directory), its result on every rank."""
    return _after_main(w, fn, args, share=True)


def main_first(w: World, fn: Callable[..., T], *args) -> T:
    """fn(*args) on rank 0, then on the other ranks: they read what rank 0 downloaded and cached."""
    result = _after_main(w, fn, args, share=False)
    return result if w.main else fn(*args)


def _after_main(w: World, fn: Callable[..., T], args: tuple, share: bool):
    if w.size == 1:
        return fn(*args)
    from torch.distributed import broadcast_object_list
    box = [None, True]  # rank 0's result (when shared) and whether it failed
    if w.main:
        try:
            result = fn(*args)
            box = [result if share else None, False]
        finally:  # also when fn failed: the other ranks learn it rather than wait for rank 0
            broadcast_object_list(box, src=0)
        return result
    broadcast_object_list(box, src=0)
    if box[1]:
        raise SystemExit(2)  # rank 0 reports the error
    return box[0]


def launch(devices: int, argv: list[str], module: str) -> NoReturn:
    """Replace this process by torchrun starting `devices` ranks of the recipe `module` (kit.recipes.llama31_sft,
    kit.recipes.dpo) with the same arguments (the ranks read --devices as their world's size)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
               "-m", module, *argv]
    sys.stdout.flush()
    os.execv(sys.executable, command)
