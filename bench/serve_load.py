"""Load for a running OpenAI-compatible server: output tokens/s and time to first token at N concurrent
streamed chat requests, each generating exactly --tokens tokens (ignore_eos), greedy.

    python bench/serve_load.py --url http://127.0.0.1:8000/v1 --model NAME --label adapter --concurrency 1 32

Prints one JSON line per concurrency level. With --profile-dir (the torch_profiler_dir of a server started with
vLLM's --profiler-config), one more round per level runs under vLLM's profiler, and bench/kernel_profile.py's
summary of its trace follows as another line. Numbers belong in docs/benchmarks.md with the hardware named.
"""
import argparse
import asyncio
import json
import statistics
import time
import urllib.request
from pathlib import Path

import kernel_profile

PROMPT = "서울에서 부산까지 가는 가장 좋은 방법을 자세히 설명해 주세요. 교통수단별 장단점도 알려 주세요."


async def one(client, model: str, tokens: int) -> tuple[float, int]:
    """(seconds to the first content chunk, completion tokens) of one streamed request."""
    t0 = time.perf_counter()
    ttft, used = None, 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "min_tokens": tokens})
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage:
            used = chunk.usage.completion_tokens
    return ttft, used


async def level(client, model: str, n: int, tokens: int, repeats: int) -> dict:
    """Median over repeats of n simultaneous requests, after one warm-up round at the same concurrency."""
    await asyncio.gather(*[one(client, model, tokens) for _ in range(n)])
    rates, ttfts = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        results = await asyncio.gather(*[one(client, model, tokens) for _ in range(n)])
        wall = time.perf_counter() - t0
        made = sum(r[1] for r in results)
        if made != n * tokens:
            raise SystemExit(f"{model}: expected {n * tokens} completion tokens, got {made}")
        rates.append(made / wall)
        ttfts += [r[0] for r in results]
    return {"concurrency": n, "output_tokens_per_s": round(statistics.median(rates), 1),
            "output_tokens_per_s_runs": [round(r, 1) for r in rates],
            "ttft_median_s": round(statistics.median(ttfts), 4), "ttft_max_s": round(max(ttfts), 4)}


def post(url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=600).close()


async def profiled(client, url: str, model: str, n: int, tokens: int, trace_dir: Path) -> dict:
    """One round of n requests under vLLM's profiler (the server writes the trace when it stops), summarized."""
    before = set(trace_dir.glob("*.pt.trace.json*"))
    root = url.removesuffix("/v1")
    post(root + "/start_profile")
    t0 = time.perf_counter()
    results = await asyncio.gather(*[one(client, model, tokens) for _ in range(n)])
    wall = time.perf_counter() - t0
    post(root + "/stop_profile")
    for _ in range(300):
        new = sorted(set(trace_dir.glob("*.pt.trace.json*")) - before, key=lambda p: p.stat().st_mtime)
        if new:
            break
        await asyncio.sleep(1)
    else:
        raise SystemExit(f"{model}: no new trace in {trace_dir} after the profiled round")
    return {"concurrency": n, "profiled_output_tokens_per_s": round(sum(r[1] for r in results) / wall, 1),
            **kernel_profile.summarize(new[-1], tokens)}


async def answer(client, model: str) -> str:
    """The greedy answer to the prompt (32 tokens): adapter and merged should say the same."""
    r = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                             max_tokens=32, temperature=0)
    return r.choices[0].message.content


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--label", help="what is served (base, adapter, merged)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile-dir", type=Path,
                    help="the server's torch_profiler_dir: profile one more round per level")
    a = ap.parse_args()
    import openai
    client = openai.AsyncOpenAI(base_url=a.url, api_key="none", timeout=600)
    label = a.label or a.model
    print(json.dumps({"label": label, "greedy_answer": await answer(client, a.model)}, ensure_ascii=False), flush=True)
    for n in a.concurrency:
        row = await level(client, a.model, n, a.tokens, a.repeats)
        print(json.dumps({"label": label, "tokens": a.tokens, **row}), flush=True)
    for n in a.concurrency if a.profile_dir else []:
        row = await profiled(client, a.url, a.model, n, a.tokens, a.profile_dir)
        print(json.dumps({"label": label, "tokens": a.tokens, **row}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
