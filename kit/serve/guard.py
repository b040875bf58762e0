"""Ends vLLM's process group when kit serve ends, however it ends, SIGKILL included.

kit serve starts this guard in a session of its own (a signal to kit serve's process group does not
reach it) with a pipe on its stdin that only kit serve holds. When kit serve's process is gone, the
kernel closes the pipe and the guard stops the group: SIGTERM, then SIGKILL to whatever is left after the
grace period (vLLM may not act on SIGTERM while it starts up). Before kit serve exits cleanly, having
stopped vLLM itself, it writes one byte: nothing left to do.

    python -m kit.serve.guard PGID GRACE_SECONDS
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Optional


def end_group(pgid: int, grace: float, leader=None) -> None:
    """SIGTERM to process group `pgid`, SIGKILL to what remains after `grace` seconds. `leader`: the
    group's leader when it is the caller's child (a subprocess.Popen), reaped so that it stops counting."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if leader is not None:
            leader.poll()
        if not _alive(pgid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    if leader is not None:
        leader.wait()


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    pgid, grace = int(args[0]), float(args[1])
    if sys.stdin.buffer.read(1):  # kit serve stopped vLLM itself
        return 0
    end_group(pgid, grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
