"""Judging a run: answers from base + adapter (infer), exports and servers against them (verify),
lm-evaluation-harness on the held-out split (evaluation), base against fine-tune (compare). May import the packages
below it: kit.core .. kit.serve."""
