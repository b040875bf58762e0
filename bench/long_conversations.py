"""Write multi-turn Korean conversations built from the kit's sample set, about 1,500-2,000 tokens each,
so that a max_seq_length=2048 benchmark trains on rows of realistic length (every assistant turn trained).

    python bench/long_conversations.py OUT.jsonl [--conversations 200] [--turns 24]
"""
import argparse
import json
import random

from kit.data.rows import SAMPLE_FILE


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--conversations", type=int, default=200)
    p.add_argument("--turns", type=int, default=48)
    a = p.parse_args()
    pairs = [json.loads(line) for line in SAMPLE_FILE.read_text(encoding="utf-8").splitlines()]
    rng = random.Random(0)
    with open(a.out, "w", encoding="utf-8") as f:
        for _ in range(a.conversations):
            msgs = []
            for row in rng.sample(pairs, a.turns):
                q = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
                msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": row["output"]}]
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
