#!/usr/bin/env bash
# Serving benchmark on a CUDA GPU (numbers in docs/benchmarks.md): the kit's own run directory served by
# `kit serve`, base + rank-16 adapter on one vLLM server, then the run's merged 16-bit export on another,
# each measured by bench/serve_load.py (256 output tokens per request, at 1 and 32 concurrent requests) through
# bench/serve_matrix.py (one server; GPU picks its GPU, default 0).
#   bench/gpu_serve.sh prepare   # recipe: random-weight Llama-3.1-8B-shaped base, LoRA r=16, 20 steps; export merged16
#   bench/gpu_serve.sh adapter   # kit serve RUN         -> load on the base and on the adapter
#   bench/gpu_serve.sh merged    # kit serve RUN --merged -> load on the merged model
# MODEL (default random:8b) and WORK (default /tmp/kitserve) can be changed, e.g. MODEL=random:tiny on CPU.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/tmp/kitserve}
RUN="$WORK/runs/serve8b"
PY=${PYTHON:-python}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$WORK" && cd "$WORK"   # Unsloth writes unsloth_compiled_cache/ into the working directory

case "${1:?prepare, adapter or merged}" in
  prepare)
    [ -f "$RUN/adapter/adapter_config.json" ] || "$PY" -m kit.recipes.llama31_sft --config demo \
      model.name="${MODEL:-random:8b}" model.max_seq_length=2048 train.max_steps=20 train.learning_rate=1e-3 \
      train.eval_strategy=no train.save_strategy=no data.eval_ratio=0 run.output_dir="$WORK/runs" run.name=serve8b
    [ -f "$RUN/export/merged16/config.json" ] || "$PY" -m kit.cli export "$RUN" --to merged16 ;;
  adapter)   # base + adapter as kit serve runs them, loaded on the adapter and on the base
    "$PY" "$REPO/bench/serve_matrix.py" "$RUN" --out "$WORK/adapter" --all-models --variant "adapter|${GPU:-0}||" ;;
  merged)
    "$PY" "$REPO/bench/serve_matrix.py" "$RUN" --out "$WORK/merged" --variant "merged|${GPU:-0}||--merged" ;;
esac
