"""What the sections' checks share: the Issue they report, the seeds numpy and torch accept, and the answer to a
wrong name (closest)."""
from __future__ import annotations

import difflib
from dataclasses import dataclass

SEEDS = range(2**32)  # what numpy's and torch's seeding accept


@dataclass(frozen=True)
class Issue:
    key: str
    """The dotted key the problem is about; its file and line (or override) are added when known."""
    message: str


def closest(key: str, valid: list[str]) -> str:
    best = difflib.get_close_matches(key, valid, n=2, cutoff=0.5)
    if not best:
        return "" if len(valid) < 10 else f" Valid keys: {', '.join(valid)}."
    return f" Did you mean '{best[0]}'" + (f" (or '{best[1]}')?" if len(best) > 1 else "?")
