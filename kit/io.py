"""Atomic writes: what looks complete on disk is complete.

A folder is written under a hidden temporary name beside its target and renamed into place only
when everything in it was written; a file likewise. A crash leaves the old output (or nothing).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(target: Path, replace: bool = False):
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
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
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


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
