#!/usr/bin/env bash
# Serving benchmark on a CUDA GPU (numbers in docs/benchmarks.md): the kit's own run directory served by
# `kit serve`, base + rank-16 adapter on one vLLM server, then the run's merged 16-bit export on another,
# each measured by bench/serve_load.py (256 output tokens per request, at 1 and 32 concurrent requests).
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

serve_and_load() {  # $1: "" or --merged; then: label=model pairs to load
  local flag=$1; shift
  "$PY" -m kit.cli serve "$RUN" $flag --port 8000 --timeout 590 > "$WORK/serve${flag:+-merged}.out" 2>&1 &
  local pid=$! t0=$SECONDS
  trap "kill -TERM $pid 2> /dev/null || true" EXIT   # a failed load must not leave the server running
  until curl -sf http://127.0.0.1:8000/health > /dev/null; do
    kill -0 $pid 2> /dev/null || { cat "$WORK/serve${flag:+-merged}.out"; exit 1; }
    sleep 2
  done
  echo "healthy after $((SECONDS - t0)) s"
  for pair in "$@"; do
    "$PY" "$REPO/bench/serve_load.py" --url http://127.0.0.1:8000/v1 --label "${pair%%=*}" --model "${pair#*=}"
  done
  kill -TERM $pid && wait $pid
  trap - EXIT
}

case "${1:?prepare, adapter or merged}" in
  prepare)
    [ -f "$RUN/adapter/adapter_config.json" ] || "$PY" -m kit.recipes.llama31_sft --config "$REPO/recipes/demo.yaml" \
      model.name="${MODEL:-random:8b}" model.max_seq_length=2048 train.max_steps=20 train.learning_rate=1e-3 \
      train.eval_strategy=no train.save_strategy=no data.eval_ratio=0 run.output_dir="$WORK/runs" run.name=serve8b
    [ -f "$RUN/export/merged16/config.json" ] || "$PY" -m kit.cli export "$RUN" --to merged16 ;;
  adapter)
    serve_and_load "" "base=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["base_model_name_or_path"])' \
      "$RUN/adapter/adapter_config.json")" adapter=serve8b ;;
  merged)
    serve_and_load --merged "merged=$RUN/export/merged16" ;;
esac
