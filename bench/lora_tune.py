"""Tune vLLM's LoRA (Punica) Triton kernels for Llama 3.1 8B's projections on this CUDA GPU and write the
files vLLM reads from VLLM_TUNED_CONFIG_FOLDER, which `kit serve` points at kit/serve_configs/lora.

    python bench/lora_tune.py --out kit/serve_configs/lora                 # rank 16, one adapter, TP 1
    python bench/lora_tune.py --out DIR --ranks 16 64 --kinds qkv o        # a part (one process per GPU)

Each (op, projection, tokens) is timed through vLLM's own lora_shrink / lora_expand ops, captured in a CUDA
graph as vLLM runs them; a candidate reaches the op the way vLLM's configs do (a file in a temporary
VLLM_TUNED_CONFIG_FOLDER). Prints one JSON line per shape: the default's and the best candidate's microseconds.
Several processes may write into one --out: each merges its entries under a file lock. VLLM_LORA_ENABLE_DUAL_STREAM
is 1 unless set, as kit serve sets it on CUDA (the kernels then launch with programmatic dependent launch).
"""
import argparse
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path

SEARCH = Path(tempfile.mkdtemp(prefix="lora-tune-"))
os.environ["VLLM_TUNED_CONFIG_FOLDER"] = str(SEARCH)  # before vLLM reads its environment
# as kit serve runs vLLM on CUDA: the LoRA kernels then launch with programmatic dependent launch (sm90+)
os.environ.setdefault("VLLM_LORA_ENABLE_DUAL_STREAM", "1")

import torch  # noqa: E402
from vllm.lora.ops.triton_ops import LoRAKernelMeta, lora_expand, lora_shrink  # noqa: E402
from vllm.lora.ops.triton_ops import utils as lora_utils  # noqa: E402

HIDDEN, INTERMEDIATE, KV = 4096, 14336, 1024  # Llama 3.1 8B: 32 query heads and 8 KV heads of 128
# projection -> (input size, output slices) as vLLM's Llama LoRA layers see them with tensor parallelism 1
PROJECTIONS = {"qkv": (HIDDEN, (HIDDEN, KV, KV)), "o": (HIDDEN, (HIDDEN,)),
               "gate_up": (HIDDEN, (INTERMEDIATE, INTERMEDIATE)), "down": (INTERMEDIATE, (HIDDEN,))}
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048, 8192)  # decode batches, then prefill chunks
REPLAYS = 50


def shrink_candidates(m: int, k: int, rank: int) -> list[dict]:
    out = []
    for bm, bn, bk, sk, warps, stages in itertools.product(
            (16, 64) if m > 16 else (16,), sorted({16, min(rank, 32)}), (64, 128, 256),
            (4, 8, 16, 32, 64) if m <= 256 else (1, 2, 4, 8), (4, 8), (2, 3)):
        if bk * sk <= k:
            out.append(dict(block_m=bm, block_n=bn, block_k=bk, split_k=sk, num_warps=warps, num_ctas=1,
                            group_size_m=8, num_stages=stages))
    return out


def expand_candidates(m: int, rank: int) -> list[dict]:
    return [dict(block_m=bm, block_n=bn, block_k=16, num_warps=warps, num_ctas=1, num_stages=stages)
            for bm, bn, warps, stages in itertools.product((16, 64) if m > 16 else (16,), (64, 128, 256), (4, 8),
                                                           (2, 3))]


def use(op: str, add_inputs, key: list[str], config: dict) -> None:
    """Make `config` the one vLLM's op reads next (its lookup is cached: clear it)."""
    name = f"{torch.cuda.get_device_name().replace(' ', '_').replace('-', '_')}_{op.upper()}"
    name += f"_{str(add_inputs).upper()}.json" if op == "expand" else ".json"
    for f in SEARCH.glob("*.json"):
        f.unlink()
    entry = config
    for part in reversed(key):
        entry = {part: entry}
    (SEARCH / name).write_text(json.dumps(entry))
    lora_utils.load_lora_op_config.cache_clear()
    lora_utils.get_lora_op_configs.cache_clear()


def timed(fn) -> float:
    """Microseconds per call, replayed from a CUDA graph (as vLLM decodes)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPLAYS):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / REPLAYS)
    return sorted(times)[len(times) // 2]


def tune_shape(op: str, kind: str, m: int, rank: int, max_loras: int, add_inputs) -> tuple[list[str], dict, dict]:
    k, slices = PROJECTIONS[kind]
    dev = torch.device("cuda")
    meta = LoRAKernelMeta.make(max_loras, m, dev)
    meta.prepare_tensors(torch.zeros(m, dtype=torch.int32, device=dev))  # every token on adapter 0
    args = meta.meta_args(m, False)
    x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
    a = [torch.randn(max_loras, rank, k, dtype=torch.bfloat16, device=dev) * 0.01 for _ in slices]
    b = [torch.randn(max_loras, n, rank, dtype=torch.bfloat16, device=dev) * 0.01 for n in slices]
    buffer = torch.zeros(len(slices), m, rank, dtype=torch.float32, device=dev)
    y = torch.zeros(m, sum(slices), dtype=torch.bfloat16, device=dev)
    lora_ids = args[4].size(0)  # vLLM keys the configs by this (max_loras + 1), not by max_loras
    if op == "shrink":
        key = [str(lora_ids), str(len(slices)), str(m), str(k), str(rank)]
        run, candidates = (lambda: lora_shrink(x, a, buffer, *args, 1.0)), shrink_candidates(m, k, rank)
    else:
        key = [str(lora_ids), str(len(slices)), str(m), str(rank), str(max(slices))]
        run = lambda: lora_expand(buffer, b, y, *args, offset_start=0, add_inputs=add_inputs)  # noqa: E731
        candidates = expand_candidates(m, rank)
    for f in SEARCH.glob("*.json"):
        f.unlink()
    lora_utils.load_lora_op_config.cache_clear()
    lora_utils.get_lora_op_configs.cache_clear()
    default = lora_utils.get_lora_op_configs(op, lora_ids, m, k if op == "shrink" else max(slices), rank,
                                             len(slices), add_inputs)
    results = {}
    for i, cand in enumerate([dict(default)] + candidates):
        use(op, add_inputs, key, cand)
        try:
            results[i] = timed(run)
        except Exception:  # a config Triton cannot build for this shape (shared memory, registers)
            continue
    if not results:
        raise SystemExit(f"{op} {kind} at {m} tokens: no configuration ran, not even vLLM's default")
    best = min(results, key=results.get)
    chosen = candidates[best - 1] if best else dict(default)
    return key, chosen, {"op": op, "proj": kind, "m": m, "rank": rank, "add_inputs": add_inputs,
                         "default_us": round(results.get(0, float("nan")), 2), "best_us": round(results[best], 2),
                         "config": chosen}


def merge(out: Path, name: str, entries: list[tuple[list[str], dict]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # the lock beside the temporary files, not in --out (the kit's folder ships what is there)
    tag = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:12]
    with open(Path(tempfile.gettempdir()) / f"lora-tune-{tag}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = out / name
        data = json.loads(path.read_text()) if path.exists() else {}
        for key, config in entries:
            node = data
            for part in key[:-1]:
                node = node.setdefault(part, {})
            node[key[-1]] = config
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the JSON files (VLLM_TUNED_CONFIG_FOLDER)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[16], help="LoRA ranks (vLLM's --max-lora-rank)")
    ap.add_argument("--max-loras", type=int, default=1, help="vLLM's --max-loras")
    ap.add_argument("--kinds", nargs="+", choices=sorted(PROJECTIONS), default=sorted(PROJECTIONS))
    ap.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name().replace(" ", "_").replace("-", "_")
    for op, add_inputs in (("shrink", None), ("expand", True), ("expand", False)):
        entries = []
        for kind, rank, m in itertools.product(args.kinds, args.ranks, args.tokens):
            key, config, line = tune_shape(op, kind, m, rank, args.max_loras, add_inputs)
            print(json.dumps(line), flush=True)
            entries.append((key, config))
        name = f"{gpu}_SHRINK.json" if op == "shrink" else f"{gpu}_EXPAND_{str(add_inputs).upper()}.json"
        merge(args.out, name, entries)
    shutil.rmtree(SEARCH)


if __name__ == "__main__":
    main()
