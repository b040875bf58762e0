#!/usr/bin/env bash
# Training benchmark on a CUDA GPU (numbers in docs/benchmarks.md): the recipe itself, Unsloth vs HF,
# on a random-weight model of Llama 3.1 8B's exact shape, QLoRA 4-bit, max_seq_length 2048, multi-turn
# Korean conversations of ~1,700 tokens built from the sample set (bench/long_conversations.py), batch 4,
# 50 steps with evaluation and checkpoints every 25 steps. No packing: the HF baseline cannot pack safely.
#   bench/gpu_train.sh unsloth   # run + a resume from checkpoint-25 (same run directory)
#   bench/gpu_train.sh hf        # the transformers + PEFT + bitsandbytes baseline, same model and data
# Results: runs under $WORK/runs; summaries and metrics copied to $OUT when set.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/tmp/kitbench}
mkdir -p "$WORK" && cd "$WORK"   # Unsloth writes unsloth_compiled_cache/ into the working directory
BASE="$WORK/runs/unsloth/base-model"
[ -f "$WORK/long.jsonl" ] || python "$REPO/bench/long_conversations.py" "$WORK/long.jsonl"
COMMON=(--config "$REPO/recipes/demo.yaml" model.load_in_4bit=true model.max_seq_length=2048
        data.path="$WORK/long.jsonl" train.per_device_train_batch_size=4
        train.per_device_eval_batch_size=4 train.gradient_accumulation_steps=1 train.max_steps=50
        train.learning_rate=2e-4 train.lr_scheduler_type=linear train.logging_steps=5
        train.eval_strategy=steps train.eval_steps=25 train.save_strategy=steps train.save_steps=25
        run.output_dir="$WORK/runs")
case "${1:-unsloth}" in
  unsloth)
    python -m kit.recipes.llama31_sft "${COMMON[@]}" model.name=random:8b model.backend=unsloth run.name=unsloth
    cp "$WORK/runs/unsloth/metrics.jsonl" "$WORK/runs/unsloth/metrics-first.jsonl"
    python -m kit.recipes.llama31_sft "${COMMON[@]}" model.name=random:8b model.backend=unsloth run.name=unsloth \
      train.resume_from_checkpoint="$WORK/runs/unsloth/checkpoints/checkpoint-25" ;;
  hf)
    python -m kit.recipes.llama31_sft "${COMMON[@]}" model.name="$BASE" model.backend=hf run.name=hf ;;
esac
if [ -n "${OUT:-}" ]; then
  for r in "$WORK"/runs/*/; do n=$(basename "$r"); cp "$r"manifest.json "$OUT/$n-manifest.json"; cp "$r"metrics*.jsonl "$OUT/" 2>/dev/null || true; done
fi
