"""Make the kit's Korean preference set, ko_pairs.jsonl, from the sample set beside it (ko_sample.jsonl).

    python kit/data/make_pairs.py            # rewrites kit/data/ko_pairs.jsonl; the same file every time

Each row of the sample set becomes one pair in LLaMA-Factory's alpaca preference form (instruction, input,
chosen, rejected): chosen is the sample's reference answer; rejected is a wrong answer of the same shape, the
reference answer of another question of the same kind (the question with its numbers and quoted words taken
out: "2 곱하기 16는 얼마인가요?" and "14 곱하기 14는 얼마인가요?" are one kind), drawn with a fixed seed. A question
whose kind has no other member gets the answer of another such question. Answers equal to the chosen one are
never drawn.
"""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
SOURCE, TARGET = HERE / "ko_sample.jsonl", HERE / "ko_pairs.jsonl"
SEED = 27


def kind(row: dict) -> str:
    """The question with its numbers and quoted words replaced: questions of one template share it."""
    text = re.sub(r"'[^']*'", "'X'", row["instruction"])
    return re.sub(r"\d+", "N", text) + ("+input" if row.get("input") else "")


def make_pairs(rows: list[dict], seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(kind(row), []).append(i)
    singles = [i for members in groups.values() if len(members) == 1 for i in members]
    pairs = []
    for i, row in enumerate(rows):
        members = groups[kind(row)]
        pool = members if len(members) > 1 else singles
        others = [j for j in pool if j != i and rows[j]["output"].strip() != row["output"].strip()]
        if not others:  # pragma: no cover - the sample set always offers one
            others = [j for j in range(len(rows)) if rows[j]["output"].strip() != row["output"].strip()]
        pairs.append({"instruction": row["instruction"], "input": row.get("input", ""), "chosen": row["output"],
                      "rejected": rows[rng.choice(others)]["output"]})
    return pairs


def main() -> int:
    rows = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = make_pairs(rows)
    TARGET.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    print(f"wrote {len(pairs)} pairs to {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
