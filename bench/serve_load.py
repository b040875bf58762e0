"""Load for a running OpenAI-compatible server: output tokens/s and time to first token at N concurrent
streamed chat requests, each generating exactly --tokens tokens (ignore_eos), greedy.

    python bench/serve_load.py --url http://127.0.0.1:8000/v1 --model NAME --label adapter --concurrency 1 32

The requests of a round are spread over --clients processes: one Python process reading streamed chunks with
the OpenAI client can fill its core before the server is busy (on a 2-core machine, against
bench/stand_in_server.py; not on the 16-core GPU machine at 32 requests: docs/benchmarks.md has both).

Prints one JSON line per concurrency level. With --profile-dir (the torch_profiler_dir of a server started with
vLLM's --profiler-config), one more round per level runs under vLLM's profiler, and bench/kernel_profile.py's
summary of its trace follows as another line. Numbers belong in docs/benchmarks.md with the hardware named.
"""
import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import kernel_profile

PROMPT = "서울에서 부산까지 가는 가장 좋은 방법을 자세히 설명해 주세요. 교통수단별 장단점도 알려 주세요."


@dataclass
class Request:
    started: float
    """time.monotonic() (one clock for all processes of this host) when the request was sent"""
    ended: float
    ttft: float
    """seconds to the first content chunk"""
    tokens: int


async def one(client, model: str, tokens: int) -> Request:
    started = time.monotonic()
    ttft, used = None, 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "min_tokens": tokens})
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.monotonic() - started
        if chunk.usage:
            used = chunk.usage.completion_tokens
    return Request(started, time.monotonic(), ttft, used)


@dataclass
class Round:
    tokens_per_s: float
    """output tokens over the span from the first request's start to the last one's end"""
    requests: list[Request]


def requests_in_this_process(url: str, model: str, n: int, tokens: int) -> list[Request]:
    """n simultaneous requests from one client process (a pool worker)."""
    import openai

    async def go():
        client = openai.AsyncOpenAI(base_url=url, api_key="none", timeout=600)
        return await asyncio.gather(*[one(client, model, tokens) for _ in range(n)])
    return asyncio.run(go())


def one_round(pool, clients: int, url: str, model: str, n: int, tokens: int) -> Round:
    """n simultaneous requests spread over the pool's `clients` processes."""
    shares = [n // clients + (i < n % clients) for i in range(clients)]
    done = pool.starmap(requests_in_this_process, [(url, model, k, tokens) for k in shares if k])
    made = [r for share in done for r in share]
    if sum(r.tokens for r in made) != n * tokens:
        raise SystemExit(f"{model}: expected {n * tokens} completion tokens, got {sum(r.tokens for r in made)}")
    return Round(n * tokens / (max(r.ended for r in made) - min(r.started for r in made)), made)


def level(pool, clients: int, url: str, model: str, n: int, tokens: int, repeats: int) -> dict:
    """Median over repeats of n simultaneous requests, after one warm-up round at the same concurrency."""
    one_round(pool, clients, url, model, n, tokens)
    rates, ttfts = [], []
    for _ in range(repeats):
        done = one_round(pool, clients, url, model, n, tokens)
        rates.append(done.tokens_per_s)
        ttfts += [r.ttft for r in done.requests]
    return {"concurrency": n, "output_tokens_per_s": round(statistics.median(rates), 1),
            "output_tokens_per_s_runs": [round(r, 1) for r in rates],
            "ttft_median_s": round(statistics.median(ttfts), 4), "ttft_max_s": round(max(ttfts), 4)}


def post(url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=600).close()


def profiled(pool, clients: int, url: str, model: str, n: int, tokens: int, trace_dir: Path) -> dict:
    """One round of n requests under vLLM's profiler (the server writes the trace when it stops), summarized."""
    before = set(trace_dir.glob("*.pt.trace.json*"))
    root = url.removesuffix("/v1")
    post(root + "/start_profile")
    profiled_round = one_round(pool, clients, url, model, n, tokens)
    post(root + "/stop_profile")
    for _ in range(300):
        new = sorted(set(trace_dir.glob("*.pt.trace.json*")) - before, key=lambda p: p.stat().st_mtime)
        if new:
            break
        time.sleep(1)
    else:
        raise SystemExit(f"{model}: no new trace in {trace_dir} after the profiled round")
    return {"concurrency": n, "profiled_output_tokens_per_s": round(profiled_round.tokens_per_s, 1),
            **kernel_profile.summarize(new[-1], tokens)}


async def answer(url: str, model: str) -> str:
    """The greedy answer to the prompt (32 tokens): adapter and merged should say the same."""
    import openai
    client = openai.AsyncOpenAI(base_url=url, api_key="none", timeout=600)
    r = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                             max_tokens=32, temperature=0)
    return r.choices[0].message.content


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--label", help="what is served (base, adapter, merged)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                    help="client processes a round's requests are spread over (default: half the cores)")
    ap.add_argument("--profile-dir", type=Path,
                    help="the server's torch_profiler_dir: profile one more round per level")
    a = ap.parse_args()
    label = a.label or a.model
    print(json.dumps({"label": label, "greedy_answer": asyncio.run(answer(a.url, a.model))}, ensure_ascii=False),
          flush=True)
    for n in a.concurrency:
        clients = min(n, a.clients)
        with multiprocessing.get_context("spawn").Pool(clients) as pool:
            row = level(pool, clients, a.url, a.model, n, a.tokens, a.repeats)
            print(json.dumps({"label": label, "tokens": a.tokens, "clients": clients, **row}), flush=True)
            if a.profile_dir:
                row = profiled(pool, clients, a.url, a.model, n, a.tokens, a.profile_dir)
                print(json.dumps({"label": label, "tokens": a.tokens, **row}), flush=True)


if __name__ == "__main__":
    main()
