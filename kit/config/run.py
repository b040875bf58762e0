"""The run section: where the run directory is (run.output_dir/run.name)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from kit.config.issue import Issue

NAME_MAX = 255  # bytes in one file name on Linux and macOS file systems


@dataclass
class RunConfig:
    name: str = "llama31_sft"
    """Run directory name under output_dir."""
    output_dir: str = "runs"
    """Parent folder of run directories."""
    overwrite: bool = False
    """Replace an existing run directory (the old one is moved aside, not deleted)."""


# ---------------------------------------------------------------- validation

def issues(r: RunConfig) -> Iterator[Issue]:
    name = r.name
    if not name or "/" in name or name in (".", "..") or not name.isprintable():
        yield Issue("run.name", f"run.name={name!r}: use a plain folder name.")
    elif len(name.encode()) > NAME_MAX:
        yield Issue("run.name", f"run.name is {len(name.encode())} bytes long; file systems allow {NAME_MAX}. "
                    "Choose a shorter name.")
    if not r.output_dir.strip() or not r.output_dir.isprintable():
        yield Issue("run.output_dir", f"run.output_dir={r.output_dir!r}: give a folder, e.g. runs.")
