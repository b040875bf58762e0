"""Where a served model's decode time goes on the GPU: one torch profiler trace (vLLM's --profiler-config
torch, as bench/serve_load.py --profile-dir takes it) summed by kernel kind, per decode step.

    python bench/kernel_profile.py TRACE.pt.trace.json.gz --steps 256

A step is one token of each request (--steps: the tokens each request generated while profiled). Prints one
JSON object: the window from the first GPU activity to the last, the share of it the GPU was busy (kernels
on any stream, overlaps counted once), milliseconds per step by kind, and the largest kernels. Numbers belong
in docs/benchmarks.md with the hardware named.
"""
import argparse
import gzip
import json
import re
from pathlib import Path

GPU_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")
# first match wins: LoRA's Triton kernels before the GEMMs, attention (FlashAttention is built on CUTLASS)
# before them too. Inductor names a fused kernel after every op in it, so a norm or SiLU fused with FP8's
# activation quantization carries "cutlass_scaled_mm" in its name: quantization, not a GEMM. Inductor's other
# fused kernels (norms, SiLU) are "triton".
KINDS = (("lora", r"lora|sgmv|bgmv|punica"),
         ("attention", r"flash|fmha|attn|attention|paged|reshape_and_cache"),
         ("quantization", r"^triton_.*(scaled_mm|quant)"),
         ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|marlin|wgmma|sm90_|scaled_mm"),
         ("quantization", r"quant|fp8"),
         ("rotary", r"rotary|rope"),
         ("sampling", r"argmax|sampl|softmax|topk|top_k|sort|gumbel|exponential|logprob"),
         ("triton", r"^triton_"),
         ("memcpy", r"memcpy|memset"))


def kind(name: str) -> str:
    lowered = name.lower()
    return next((k for k, pattern in KINDS if re.search(pattern, lowered)), "other")


def gpu_events(trace: Path) -> list[dict]:
    opener = gzip.open if trace.suffix == ".gz" else open
    with opener(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("cat") in GPU_EVENTS and e.get("dur", 0) > 0]


def busy_us(events: list[dict]) -> float:
    """Microseconds in which at least one GPU event ran (the union of their intervals)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def summarize(trace: Path, steps: int, top: int = 12) -> dict:
    events = gpu_events(trace)
    if not events:
        return {"trace": trace.name, "error": "no GPU kernels in the trace (vLLM's CPU build profiles CPU only)"}
    window = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    by_kind: dict[str, float] = {}
    by_name: dict[str, list] = {}
    for e in events:
        by_kind[kind(e["name"])] = by_kind.get(kind(e["name"]), 0.0) + e["dur"]
        entry = by_name.setdefault(e["name"], [0.0, 0])
        entry[0] += e["dur"]
        entry[1] += 1
    busy = busy_us(events)
    largest = sorted(by_name.items(), key=lambda item: -item[1][0])[:top]
    return {"trace": trace.name, "steps": steps, "window_ms": round(window / 1e3, 2),
            "ms_per_step": round(window / 1e3 / steps, 3), "gpu_busy_share": round(busy / window, 3),
            "idle_ms_per_step": round((window - busy) / 1e3 / steps, 3),
            "kernel_ms_per_step": {k: round(v / 1e3 / steps, 3)
                                   for k, v in sorted(by_kind.items(), key=lambda i: -i[1])},
            "largest": [{"kernel": name[:120], "kind": kind(name), "ms_per_step": round(us / 1e3 / steps, 4),
                         "calls_per_step": round(calls / steps, 1)} for name, (us, calls) in largest]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path)
    ap.add_argument("--steps", type=int, required=True, help="tokens each request generated while profiled")
    args = ap.parse_args()
    print(json.dumps(summarize(args.trace, args.steps)))


if __name__ == "__main__":
    main()
