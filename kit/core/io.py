"""Atomic writes: what looks complete on disk is complete.

A folder is written under a hidden temporary name beside its target and renamed into place only
when everything in it was written; a file likewise. A crash leaves the old output (or nothing), and
the hidden leftovers of a killed writer are cleaned by the next write of the same target.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger("kit")


def disk_full(e: Exception) -> bool:
    """ENOSPC as Python raises it, or as the Rust writers (safetensors, tokenizers) word it in their own errors."""
    return getattr(e, "errno", None) == errno.ENOSPC or f"(os error {errno.ENOSPC})" in str(e)


@contextlib.contextmanager
def atomic_dir(target: Path, replace: bool = False):
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            if not replace:
                raise FileExistsError(f"{target} appeared while it was being written; nothing was replaced.")
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def clean_leftovers(target: Path) -> None:
    """Remove what a killed writer of `target` left: its partial copy, and the old copy it was replacing (put
    back first if the target is missing: the kill came between the two renames). Another live process's
    leftovers are its work in progress and stay."""
    for left in sorted(target.parent.glob(f".{glob.escape(target.name)}.*-*")):
        kind, _, pid = left.name[len(target.name) + 2:].rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not target.exists():
            os.replace(left, target)
            log.warning(f"{target}: put back the previous copy, which an interrupted write (process {pid}) had "
                        "moved aside.")
            continue
        if left.is_dir():
            shutil.rmtree(left)
        else:
            left.unlink()
        log.warning(f"{target}: removed {left.name}, left by an interrupted write (process {pid}).")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return True


def move_aside(path: Path) -> Path:
    """Rename an existing output instead of deleting it: nothing a user made is lost."""
    aside = path.parent / f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(path, aside)
    return aside


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
