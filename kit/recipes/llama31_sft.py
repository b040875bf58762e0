"""Fine-tune Llama 3.1 8B Instruct with LoRA or 4-bit QLoRA: setup -> train -> save.

    python -m kit.recipes.llama31_sft                                  # the llama31_sft recipe
    python -m kit.recipes.llama31_sft --config demo                    # tiny model, CPU, minutes
    python -m kit.recipes.llama31_sft train.learning_rate=2e-4 lora.r=32 data.path=./my.jsonl
    python -m kit.recipes.llama31_sft --plan                           # steps, checkpoints; no model
    python -m kit.recipes.llama31_sft --devices 2                      # 2 GPUs, one process each (torchrun)

--config names a recipe shipped in the kit (llama31_sft, demo) or a YAML file of your own. train.method picks the
trainer (sft; dpo and orpo on preference pairs: kit.recipes.dpo runs the same steps with the dpo recipe).
Backends: Unsloth (default; its CUDA kernels, or its CPU fallback) or transformers + PEFT (model.backend=hf).
The run directory runs/<run.name>/ receives config.yaml, manifest.json, metrics.jsonl (with sample answers),
tensorboard/ (and wandb/ or mlflow.db: train.report_to), loss.png, checkpoints/ and the final PEFT adapter in
adapter/ (kit.run.rundir).
"""
from __future__ import annotations

import sys
from typing import Optional

from kit.config.load import DEFAULT_RECIPE
from kit.recipes import steps

MODULE = "kit.recipes.llama31_sft"  # what a run records and torchrun starts (kit.recipes.dpo: its own)
PROG = f"python -m {MODULE}"


def main(argv: Optional[list[str]] = None, prog: str = PROG) -> int:
    return steps.main(argv, prog, recipe=DEFAULT_RECIPE, methods=("sft", "dpo", "orpo"), doc=__doc__, module=MODULE)


if __name__ == "__main__":
    sys.exit(main())
