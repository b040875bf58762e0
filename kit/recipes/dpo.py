"""Preference training (DPO, or ORPO with train.method=orpo) with LoRA or 4-bit QLoRA: setup -> train -> save,
the same steps as kit.recipes.llama31_sft, on preference pairs (kit.data.preference).

    python -m kit.recipes.dpo                                    # the dpo recipe: Llama 3.1 8B, QLoRA
    python -m kit.recipes.dpo --config dpo_demo                  # SmolLM2-135M on the shipped Korean pairs, CPU
    python -m kit.recipes.dpo --config dpo_demo train.method=orpo
    python -m kit.recipes.dpo train.beta=0.2 train.loss_type=ipo data.path=./pairs.jsonl
    python -m kit.recipes.dpo --plan                             # steps, checkpoints; no model

Pairs: {instruction, input, chosen, rejected} (LLaMA-Factory), {prompt, chosen, rejected} (TRL; text or
messages) or {chosen, rejected} conversations sharing their prompt turns. DPO's reference is the base with the
adapter disabled (no second copy of the model); ORPO has none. manifest.json records the method, the reference
and the held-out preference accuracy ("preference"); metrics.jsonl TRL's rewards/chosen, rewards/rejected,
rewards/accuracies and rewards/margins.
"""
from __future__ import annotations

import sys
from typing import Optional

from kit.recipes import steps

MODULE = "kit.recipes.dpo"  # recorded in the manifest and started by torchrun (--devices)
PROG = f"python -m {MODULE}"


def main(argv: Optional[list[str]] = None, prog: str = PROG) -> int:
    return steps.main(argv, prog, recipe="dpo", methods=("dpo", "orpo"), doc=__doc__, module=MODULE)


if __name__ == "__main__":
    sys.exit(main())
