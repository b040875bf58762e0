"""Serving variants side by side in one call: one `kit serve` per variant, on the GPUs of this host, then
bench/serve_load.py on each (one at a time), greedy answers to the run's training questions, then all stopped.
Variants on different GPUs start together; variants sharing a GPU start one after another, each once the one
before it is healthy, because vLLM sizes its KV cache from the GPU's free memory and would count a neighbour's
allocations during its own memory profile as its own. Numbers belong in docs/benchmarks.md with the hardware
named.

    python bench/serve_matrix.py RUN --out DIR \\
        --variant "merged|0||--merged" \\
        --variant "adapter|1|VLLM_LORA_ENABLE_DUAL_STREAM=0|--adapter" \\
        --variant "fp8|2||--merged --fp8"

A variant is LABEL|GPU|ENV=VALUE,...|kit serve options. Prints one JSON line per variant and concurrency
(serve_load's; with --all-models also LABEL-base for an adapter server's base), writes DIR/greedy-LABEL.json
(answers with their two best tokens' log-probabilities) and DIR/serve-LABEL.log. --after runs a command while
the servers still run, with KIT_MATRIX_URLS="LABEL=URL ...". --profile starts each server with vLLM's torch
profiler (traces in DIR/profile-LABEL) and adds serve_load's profiled round per concurrency level.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

BENCH = Path(__file__).parent


@dataclass
class Variant:
    label: str
    gpu: str
    env: dict
    options: list
    port: int
    proc: Optional[subprocess.Popen] = None
    started: Optional[float] = None
    healthy_after: Optional[float] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def parse(text: str, port: int) -> Variant:
    label, gpu, env, options = text.split("|")
    pairs = dict(p.split("=", 1) for p in env.split(",") if p)
    return Variant(label, gpu, pairs, options.split(), port)


def healthy(v: Variant) -> bool:
    try:
        with urllib.request.urlopen(v.url.removesuffix("/v1") + "/health", timeout=2):
            return True
    except OSError:
        return False


def served_models(url: str) -> list[str]:
    """What the server at `url` (ending in /v1) serves, its adapters first (the base last)."""
    with urllib.request.urlopen(url + "/models", timeout=10) as r:
        models = json.load(r)["data"]
    return [m["id"] for m in models if m.get("parent")] + [m["id"] for m in models if not m.get("parent")]


def greedy(v: Variant, model: str, questions: list[str], tokens: int) -> list[dict]:
    from openai import OpenAI
    client = OpenAI(base_url=v.url, api_key=os.environ.get("KIT_API_KEY", "none"))
    answers = []
    for q in questions:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], max_tokens=tokens,
                                           temperature=0, logprobs=True, top_logprobs=2)
        choice = r.choices[0]
        answers.append({"text": choice.message.content,
                        "top2": [[t.token, [[a.token, a.logprob] for a in t.top_logprobs]]
                                 for t in choice.logprobs.content]})
    return answers


def questions_of(data: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()[:n]]
    return [r["instruction"] + ("\n" + r["input"] if r.get("input") else "") for r in rows]


def profile_dir(v: Variant, out: Path) -> Path:
    return (out / f"profile-{v.label}").resolve()


def profiler_options(v: Variant, out: Path) -> list[str]:
    """vLLM options (after kit serve's --) for its torch profiler, started and stopped by serve_load: GPU
    kernels of the engine only, without Python stacks (they would slow the host side being measured)."""
    config = {"profiler": "torch", "torch_profiler_dir": str(profile_dir(v, out)), "torch_profiler_with_stack": False,
              "ignore_frontend": True}
    return ([] if "--" in v.options else ["--"]) + ["--profiler-config", json.dumps(config, separators=(",", ":"))]


def launch(v: Variant, out: Path, run: Path, timeout: float, profile: bool) -> None:
    env = {**os.environ, **v.env, "CUDA_VISIBLE_DEVICES": v.gpu}
    options = [*v.options, *(profiler_options(v, out) if profile else [])]
    with open(out / f"serve-{v.label}.log", "w") as log:  # the child keeps its own descriptor
        v.proc = subprocess.Popen([sys.executable, "-m", "kit.cli", "serve", str(run), "--port", str(v.port),
                                   "--timeout", str(timeout), *options], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    v.started = time.monotonic()


def start_all(variants: list[Variant], out: Path, run: Path, timeout: float, profile: bool = False) -> None:
    """Start the first variant of each GPU, and each next one of a GPU once the one before it is healthy (or
    failed); --timeout counts for each server from its own start."""
    queues: dict[str, list[Variant]] = {}
    for v in variants:
        queues.setdefault(v.gpu, []).append(v)
    for queue in queues.values():
        launch(queue.pop(0), out, run, timeout, profile)
    starting = [v for v in variants if v.proc is not None]
    while starting:
        for v in list(starting):
            waited = time.monotonic() - v.started
            if v.proc.poll() is not None:
                print(json.dumps({"label": v.label, "error": f"kit serve exited {v.proc.returncode}"}), flush=True)
            elif healthy(v):
                v.healthy_after = round(waited, 1)
            elif waited > timeout:
                print(json.dumps({"label": v.label, "error": f"not healthy after {timeout:g} s"}), flush=True)
            else:
                continue
            starting.remove(v)
            if queues[v.gpu]:
                nxt = queues[v.gpu].pop(0)
                launch(nxt, out, run, timeout, profile)
                starting.append(nxt)
        time.sleep(2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variant", action="append", required=True, help="LABEL|GPU|ENV=VALUE,...|kit serve options")
    ap.add_argument("--port", type=int, default=8100, help="first port; one per variant")
    ap.add_argument("--questions", type=Path, help="KoAlpaca JSONL: its first --greedy rows are asked greedily")
    ap.add_argument("--greedy", type=int, default=16)
    ap.add_argument("--greedy-tokens", type=int, default=48)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per concurrency level (median reported)")
    ap.add_argument("--all-models", action="store_true", help="load the server's base too, not only its adapter")
    ap.add_argument("--timeout", type=float, default=480, help="seconds each server may take to become healthy")
    ap.add_argument("--profile", action="store_true", help="vLLM's torch profiler: one profiled round per level")
    ap.add_argument("--after", help="a command run while the servers run (KIT_MATRIX_URLS names them)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    variants = [parse(t, args.port + i) for i, t in enumerate(args.variant)]
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a timeout or a closed terminal still stops the servers
        signal.signal(sig, lambda *_: sys.exit(1))
    try:
        start_all(variants, args.out, args.run, args.timeout, args.profile)
        up = [v for v in variants if v.healthy_after is not None]
        for v in up:
            models = served_models(v.url)
            model = models[0]
            print(json.dumps({"label": v.label, "healthy_after_s": v.healthy_after, "model": model, "gpu": v.gpu,
                              "env": v.env, "options": v.options}), flush=True)
            for other in models if args.all_models else [model]:
                label = v.label if other == model else f"{v.label}-base"
                profiled = ["--profile-dir", str(profile_dir(v, args.out))] if args.profile else []
                subprocess.run([sys.executable, str(BENCH / "serve_load.py"), "--url", v.url, "--model", other,
                                "--label", label, "--concurrency", *map(str, args.concurrency),
                                "--repeats", str(args.repeats), *profiled],
                               check=False)
            if args.questions:
                answers = greedy(v, model, questions_of(args.questions, args.greedy), args.greedy_tokens)
                (args.out / f"greedy-{v.label}.json").write_text(json.dumps(answers, ensure_ascii=False))
        if args.after:
            urls = " ".join(f"{v.label}={v.url}" for v in up)
            subprocess.run(args.after, shell=True, env=dict(os.environ, KIT_MATRIX_URLS=urls), check=False)
    finally:
        started = [v for v in variants if v.proc is not None]
        for v in started:
            if v.proc.poll() is None:
                os.killpg(v.proc.pid, signal.SIGTERM)
        for v in started:
            try:
                v.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(v.proc.pid, signal.SIGKILL)
                v.proc.wait()
    return 0 if all(v.healthy_after is not None for v in variants) else 1


if __name__ == "__main__":
    sys.exit(main())
