"""Training speed on one CUDA GPU, side by side in one call: the kit's recipe as shipped, Unsloth called
directly on full 2,048-token rows (with and without its checkpointing), Unsloth in TRL's SFTTrainer with
padding-free batches of 32 (with and without), and the HF backend, on one log-normal length mix of Korean
KoAlpaca-format rows. Reports steady-state real tokens/s and peak GPU memory, each kit row against the best
Unsloth row and the best one that fits its model.gpu_memory_gib (docs/benchmarks.md).

    python bench/train_speed.py table --work /tmp/kitspeed          # the whole table, one subprocess a row
    python bench/train_speed.py data OUT.jsonl                       # the length mix alone
    python bench/train_speed.py prepare --work W                     # the mix and the random 8B model
    python bench/train_speed.py kit --work W --label NAME [key=value ...]   # one recipe run -> one JSON line
    python bench/train_speed.py kit --work W --label two --steps 20 --devices 2 train.gradient_accumulation_steps=2
    python bench/train_speed.py direct --work W [--shape 4x2048 ...] [--no-checkpointing]   # Unsloth called directly
    python bench/train_speed.py trl --work W [--batch 32] [--no-checkpointing]   # Unsloth in TRL, padding-free
    add --fp8 to `direct` or `trl`: Unsloth's FP8 base (load_in_fp8) in place of NF4 (Hopper or newer)
    add --profile N to `kit` or `direct`: torch.profiler over optimizer step N+1, where time went
    python bench/train_speed.py long --work W [--lengths 32768 65536 98304 131072] [--budget 24] [--whole 65536 81360]
        the long-context table: one example of each length a step, 2 steps (--steps), at model.gpu_memory_gib=BUDGET
        with checkpointing and train.tiled_mlp=auto (--whole: these lengths also with the MLP whole); GPU peak vs
        estimate, and the process's resident memory beside the offloaded checkpoints' estimate
    python bench/train_speed.py long --work W --budget 80 --lengths 262144 411000 --steps 1   # past 131,072

Steady state = real (non-padding) tokens between the first logged step >= 2 and the last one, over the
time between them; the figure "with warm-up" counts the whole run. Peak = torch.cuda.max_memory_allocated
from the start of training. The model is a random-weight Llama-3.1-8B shape (speed does not depend on
the weights); QLoRA nf4, LoRA r=16 on all 7 projections, max_seq_length 2048, as recipes/llama31_sft.yaml.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

MEDIAN_TOKENS, SIGMA, CAP = 230, 0.9, 2040   # p95 = 230 * exp(1.645 * 0.9) ~ 1,000 tokens
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------- data

def stitched(tok, sample: list[dict], rng: random.Random, need: int) -> str:
    """An answer of `need` tokens: answers of the sample set, drawn with `rng`, one after another."""
    ids: list[int] = []
    while len(ids) < need:
        ids += tok(rng.choice(sample)["output"] + "\n", add_special_tokens=False)["input_ids"]
    return tok.decode(ids[:need])


def make_data(out: Path, rows: int, seed: int = 0) -> dict:
    """KoAlpaca rows whose rendered length (template included) follows the log-normal mix."""
    from kit.data.rows import SAMPLE_FILE
    from kit.models.template import load_tokenizer, render
    tok = load_tokenizer("bundled")
    sample = [json.loads(line) for line in SAMPLE_FILE.read_text(encoding="utf-8").splitlines()]
    rng = random.Random(seed)
    overhead = len(tok(render(tok, [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]),
                       add_special_tokens=False)["input_ids"])
    lengths = []
    with open(out, "w", encoding="utf-8") as f:
        for _ in range(rows):
            target = int(min(max(rng.lognormvariate(math.log(MEDIAN_TOKENS), SIGMA), overhead + 24), CAP))
            q = rng.choice(sample)["instruction"]
            need = max(target - overhead - len(tok(q, add_special_tokens=False)["input_ids"]), 4)
            answer = stitched(tok, sample, rng, need)
            f.write(json.dumps({"instruction": q, "input": "", "output": answer}, ensure_ascii=False) + "\n")
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]
            lengths.append(len(tok(render(tok, msgs), add_special_tokens=False)["input_ids"]))
    lengths.sort()
    return {"rows": rows, "median": lengths[len(lengths) // 2], "mean": round(statistics.mean(lengths)),
            "p95": lengths[int(0.95 * len(lengths))], "max": lengths[-1]}


def make_long_data(out: Path, tokens: int, rows: int = 3, seed: int = 0) -> None:
    """`rows` KoAlpaca rows whose answers are `tokens` tokens long: each is cut to the run's max_seq_length."""
    from kit.data.rows import SAMPLE_FILE
    from kit.models.template import load_tokenizer
    tok = load_tokenizer("bundled")
    sample = [json.loads(line) for line in SAMPLE_FILE.read_text(encoding="utf-8").splitlines()]
    rng = random.Random(seed)
    with open(out, "w", encoding="utf-8") as f:
        for _ in range(rows):
            f.write(json.dumps({"instruction": rng.choice(sample)["instruction"], "input": "",
                                "output": stitched(tok, sample, rng, tokens)}, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- profiling

class StepProfiler:
    """torch.profiler over optimizer steps first+1 .. first+steps, driven by torch's global optimizer hook
    (so the recipe runs unchanged); prints where GPU and host time went."""

    def __init__(self, first: int, steps: int = 1):
        import torch
        self.torch, self.first, self.steps, self.n, self.marks = torch, first, steps, 0, []
        self.cuda = torch.cuda.is_available()
        activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * self.cuda
        self.prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=max(first - 1, 0), warmup=1, active=steps, repeat=1))
        # the active window is optimizer steps first+1 .. first+steps; time it between the steps' ends
        from torch.optim.optimizer import register_optimizer_step_post_hook
        register_optimizer_step_post_hook(self._after_step)

    def _after_step(self, *_):
        self.n += 1
        if self.n in (self.first, self.first + self.steps):
            if self.cuda:
                self.torch.cuda.synchronize()
            self.marks.append(time.perf_counter())
        self.prof.step()

    def __enter__(self):
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        self.report()

    def report(self) -> None:
        events = self.prof.key_averages()
        wall = (self.marks[-1] - self.marks[0]) if len(self.marks) >= 2 else float("nan")
        # Kernels only, as the profiler's own "Self CUDA time total": an op or a user annotation (ProfilerStep#)
        # repeats the time of the kernels it launched.
        gpu = sum(e.self_device_time_total for e in events if e.device_type != self.torch.autograd.DeviceType.CPU) / 1e6
        counts = {name: next((e.count for e in events if e.key == name), 0)
                  for name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense",
                               "cudaLaunchKernel", "cudaMemcpyAsync")}
        print(json.dumps({"profile_steps": self.steps, "wall_s": round(wall, 3), "gpu_kernel_s": round(gpu, 3),
                          "gpu_busy": round(gpu / wall, 3) if wall == wall else None, "calls": counts}), flush=True)
        print(events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70), flush=True)
        print(events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70), flush=True)


# ---------------------------------------------------------------- one kit run

def steady(metrics: list[dict]) -> dict:
    rows = [m for m in metrics if "loss" in m and "num_input_tokens_seen" in m and "train_runtime" in m]
    first = next((m for m in rows if m["step"] >= 2), None)
    last = rows[-1] if rows else None
    if first is None or last is first:
        return {}
    tokens = last["num_input_tokens_seen"] - first["num_input_tokens_seen"]
    seconds = last["train_runtime"] - first["train_runtime"]
    return {"steady_tokens_per_s": round(tokens / seconds), "steady_steps": [first["step"], last["step"]],
            "warm_tokens_per_s": round(last["num_input_tokens_seen"] / last["train_runtime"])}


def run_kit(a, overrides: list[str]) -> dict:
    """The recipe exactly as a user runs it: in this process (so a profiler can watch it), or with --devices in a
    child, since the recipe then replaces its process with torchrun."""
    from kit.recipes.llama31_sft import main
    from kit.run.rundir import RunDir, read_manifest, read_metrics
    runs = Path(a.work) / "runs"
    argv = ["--config", "llama31_sft", f"model.name={a.model}",
            f"data.path={a.data}", f"train.max_steps={a.steps}", "train.eval_strategy=no",
            "train.save_strategy=no", f"run.output_dir={runs}", f"run.name={a.label}", "run.overwrite=true",
            *overrides]
    if any(o == "--devices" or o.startswith("--devices=") for o in overrides):
        rc = subprocess.run([sys.executable, "-m", "kit.recipes.llama31_sft", *argv]).returncode
    elif a.profile:
        with StepProfiler(a.profile):
            rc = main(argv)
    else:
        rc = main(argv)
    run_dir = runs / a.label
    if rc != 0:
        return {"label": a.label, "error": f"recipe exited {rc}"}
    run = RunDir(run_dir)
    metrics = read_metrics(run.metrics)
    res = read_manifest(run)["result"]
    return {"label": a.label, "overrides": overrides, **steady(metrics), "run_tokens_per_s": round(res["tokens_per_s"]),
            "peak_gib": round(res["peak_gib"], 2),
            "estimate_gib": res["estimate_gib"], "host_peak_gib": round(res["host_peak_gib"], 2),
            "host_estimate_gib": res["host_estimate_gib"], "batches": res["batches"], "attention": res["attention"],
            "loss_kernel": res["loss_kernel"], "steps": res["steps"],
            "losses": [[m["step"], round(m["loss"], 4)] for m in metrics if "loss" in m]}


# ---------------------------------------------------------------- Unsloth called directly

def run_direct(a) -> list[dict]:
    """Unsloth's own model and LoRA, a plain loop (no Trainer, one sync per step) on random tokens.
    Each --shape ROWSxLENGTH in turn on the one loaded model, the peak reset before each; with --ragged
    the rows of a shape are 60-100% real tokens, right-padded as a padded batch is."""
    import torch
    from unsloth import FastLanguageModel  # before transformers, as Unsloth asks
    model, _ = FastLanguageModel.from_pretrained(model_name=a.model, max_seq_length=a.seq, dtype=torch.bfloat16,
                                                 load_in_4bit=not a.fp8, load_in_fp8=a.fp8, use_exact_model_name=True)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0.0, bias="none", target_modules=PROJECTIONS, random_state=42,
        use_gradient_checkpointing=False if a.no_checkpointing else "unsloth", max_seq_length=a.seq)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    gen = torch.Generator(device="cuda").manual_seed(1)
    results = []
    for shape in a.shape:
        rows, width = map(int, shape.split("x"))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        profiler = StepProfiler(a.profile) if a.profile and shape == a.shape[0] else None
        if profiler:
            profiler.__enter__()
        losses, real, t_start = [], 0, time.perf_counter()
        for step in range(a.steps):
            if step == 2:
                torch.cuda.synchronize()
                t0, real = time.perf_counter(), 0
            ids = torch.randint(0, 128000, (rows, width), device="cuda", generator=gen)
            batch = {"input_ids": ids, "labels": ids}
            if a.ragged:
                lengths = torch.randint(int(0.6 * width), width + 1, (rows,), device="cuda", generator=gen)
                mask = (torch.arange(width, device="cuda")[None, :] < lengths[:, None]).long()
                batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
                real += int(lengths.sum())
            else:
                real += rows * width
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        torch.cuda.synchronize()
        end = time.perf_counter()
        if profiler:
            profiler.__exit__(None, None, None)
        padded = rows * width * (a.steps - 2)
        results.append({"label": f"{a.label}-{shape}", "shape": shape, "ragged": a.ragged, "fp8": a.fp8,
                        "checkpointing": not a.no_checkpointing,
                        "steady_tokens_per_s": round(real / (end - t0)),
                        "padded_tokens_per_s": round(padded / (end - t0)),
                        "s_per_step": round((end - t0) / (a.steps - 2), 4),
                        "warm_s": round(t0 - t_start, 1),
                        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)]})
        print(json.dumps(results[-1]), flush=True)
    return results


# ---------------------------------------------------------------- Unsloth in TRL

def run_trl(a) -> dict:
    """What an Unsloth user who knows padding-free runs: FastLanguageModel in 4-bit and TRL's SFTTrainer with
    padding_free=True, --batch rows a step, answers only in the loss, Unsloth's offloaded checkpointing unless
    --no-checkpointing; the same rows as the kit's (prompt-completion messages)."""
    import torch
    from unsloth import FastLanguageModel  # before TRL, as Unsloth asks
    cuda = torch.cuda.is_available()
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer
    model, tok = FastLanguageModel.from_pretrained(model_name=a.model, max_seq_length=a.seq, dtype=torch.bfloat16,
                                                   load_in_4bit=cuda and not a.fp8, load_in_fp8=a.fp8,
                                                   use_exact_model_name=True)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0.0, bias="none", target_modules=PROJECTIONS, random_state=42,
        use_gradient_checkpointing=False if a.no_checkpointing else "unsloth", max_seq_length=a.seq)
    data = load_dataset("json", data_files=a.data, split="train").map(
        lambda r: {"prompt": [{"role": "user", "content": r["instruction"]}],
                   "completion": [{"role": "assistant", "content": r["output"]}]},
        remove_columns=["instruction", "input", "output"])
    args = SFTConfig(output_dir=str(Path(a.work) / "peer-out" / a.label), per_device_train_batch_size=a.batch,
                     gradient_accumulation_steps=1, max_steps=a.steps, learning_rate=2e-4, bf16=cuda,
                     padding_free=True, max_length=a.seq, logging_steps=1, save_strategy="no", report_to=[],
                     include_num_input_tokens_seen="non_padding", seed=0, use_cpu=not cuda)
    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), state.num_input_tokens_seen))

    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[Clock()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    (t0, n0), (t1, n1) = marks[1], marks[-1]  # steady: from the end of step 2
    return {"label": a.label, "batch": a.batch, "checkpointing": not a.no_checkpointing,
            "steady_tokens_per_s": round((n1 - n0) / (t1 - t0)),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "losses": [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]}


# ---------------------------------------------------------------- the table

def prepare(work: Path, rows: int) -> tuple[Path, Path]:
    work.mkdir(parents=True, exist_ok=True)
    data = work / "lognormal.jsonl"
    if not data.exists():
        print(json.dumps({"data": str(data), **make_data(data, rows)}), flush=True)
    from kit.models.tiny import build_random_model
    t = time.time()
    model = build_random_model("8b", 0, work / "base-8b")
    print(json.dumps({"model": str(model), "built_s": round(time.time() - t, 1)}), flush=True)
    return data, model


def child(work: Path, *args: str) -> dict:
    """One measurement in a fresh process (its own CUDA context and peak); its last JSON line."""
    log = work / f"{args[args.index('--label') + 1]}.log"
    with open(log, "w") as fh:
        subprocess.run([sys.executable, __file__, *args], cwd=work, stdout=fh, stderr=subprocess.STDOUT)
    lines = log.read_text(errors="replace").splitlines()
    for line in lines:
        if line.startswith("Unsloth:") or "🦥" in line or "xformers" in line.lower():
            print(f"  [{log.stem}] {line.strip()[:200]}")
    result = next((json.loads(line) for line in reversed(lines) if line.startswith('{"label"')), None)
    return result or {"label": log.stem, "error": "no result; see " + str(log), "tail": lines[-15:]}


TABLE = {  # label: (kind, optimizer steps, extra arguments: recipe overrides for kit rows)
    "kit-default": ("kit", 40, []),
    "kit-80gib": ("kit", 40, ["model.gpu_memory_gib=80"]),   # an 80 GB card's budget on a larger one
    "kit-80gib-fp8": ("kit", 40, ["model.gpu_memory_gib=80", "model.load_in_fp8=true", "model.load_in_4bit=false"]),
    "kit-80gib-16bit": ("kit", 40, ["model.gpu_memory_gib=80", "model.load_in_4bit=false"]),  # the bf16 path, for FP8
    "unsloth-direct-full-rows": ("direct", 6, ["--shape", "4x2048"]),  # Unsloth's own rate on full rows
    "unsloth-direct-b4-no-recompute": ("direct", 6, ["--shape", "4x2048", "--no-checkpointing"]),
    "unsloth-direct-b8-no-recompute": ("direct", 6, ["--shape", "8x2048", "--no-checkpointing"]),
    "unsloth-direct-b8-fp8": ("direct", 6, ["--shape", "8x2048", "--no-checkpointing", "--fp8"]),
    "unsloth-trl-padding-free": ("trl", 12, ["--no-checkpointing"]),  # batch 32, as the kit's 80 GiB plan
    "unsloth-trl-padding-free-recompute": ("trl", 12, []),            # the peer of the kit's 24 GiB plan
    "kit-24gib": ("kit", 40, ["model.gpu_memory_gib=24"]),   # recompute for as few layers as fit
    "kit-24gib-fp8": ("kit", 40, ["model.gpu_memory_gib=24", "model.load_in_fp8=true", "model.load_in_4bit=false"]),
    "kit-24gib-all-layers": ("kit", 40, ["model.gpu_memory_gib=24", "train.gradient_checkpointing=true"]),
    # no recompute at 24 GiB: the plan splits each step into 8 passes of 4 (largest 2,499 tokens)
    "kit-24gib-no-recompute": ("kit", 40, ["model.gpu_memory_gib=24", "train.gradient_checkpointing=false"]),
    "kit-8gib": ("kit", 12, ["model.gpu_memory_gib=8"]),
    "kit-length-grouped-padded": ("kit", 40, ["model.gpu_memory_gib=80", "train.padding_free=false",
                                              "train.train_sampling_strategy=group_by_length"]),
    "kit-old-default": ("kit", 24, ["train.padding_free=false", "train.train_sampling_strategy=random",
                                    "train.gradient_checkpointing=true"]),   # padded random batches, recompute
    "kit-hf-backend": ("kit", 4, ["model.backend=hf"]),
}


def table(a) -> None:
    work = Path(a.work)
    data, model = prepare(work, a.rows)
    rows = []
    for label in a.only or TABLE:
        kind, steps, extra = TABLE[label]
        common = ["--work", str(work), "--label", label, "--model", str(model), "--steps", str(steps)]
        res = child(work, kind, *common, *(["--data", str(data)] if kind in ("kit", "trl") else []), *extra)
        print(json.dumps(res), flush=True)
        rows.append(res)
    print_table(rows)


def budget_gib(row: dict) -> float:
    """A kit row's model.gpu_memory_gib (inf: the whole card)."""
    given = [o.split("=", 1)[1] for o in row.get("overrides", []) if o.startswith("model.gpu_memory_gib=")]
    return float(given[-1]) if given else math.inf


def print_table(rows: list[dict]) -> None:
    """Each row against the best Unsloth row, and against the best one whose peak fits the row's budget (the
    peer at that card size: at 24 GiB, Unsloth with its checkpointing)."""
    peers = [r for r in rows if r["label"].startswith("unsloth") and r.get("steady_tokens_per_s")]
    base = max((r["steady_tokens_per_s"] for r in peers), default=0)
    print(f"\n{'run':<38} {'tokens/s steady':>15} {'with warm-up':>12} {'vs best Unsloth':>15} "
          f"{'vs Unsloth in budget':>20} {'peak GiB':>9} {'estimate':>8}  micro-batches")
    for r in rows:
        steady_rate = r.get("steady_tokens_per_s")
        ratio = f"{steady_rate / base:.2f}x" if steady_rate and base else "-"
        fitting = [p["steady_tokens_per_s"] for p in peers if p["peak_gib"] <= budget_gib(r)]
        in_budget = f"{steady_rate / max(fitting):.2f}x" if steady_rate and fitting and "overrides" in r else "-"
        estimate = f"{r['estimate_gib']:.1f}" if r.get("estimate_gib") else "-"
        print(f"{r['label']:<38} {steady_rate or '-':>15} {r.get('warm_tokens_per_s', '-'):>12} {ratio:>15} "
              f"{in_budget:>20} {r.get('peak_gib', '-'):>9} {estimate:>8}  {r.get('batches', '')}")


def long_table(a, overrides: list[str]) -> None:
    """Each length as one example a step (a.steps steps) under a.budget GiB, the MLP as the plan picks it and,
    for a.whole, whole: the recipe's GPU peak against its estimate, and the process's peak resident memory against
    the offloaded checkpoints' estimate, one child process a row."""
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = a.model or str(prepare(work, a.rows)[1])
    data = work / f"long-{max(a.lengths + a.whole)}.jsonl"
    if not data.exists():
        make_long_data(data, max(a.lengths + a.whole) + 1024)
    rows = []
    for tokens, tiled in [(t, "auto") for t in a.lengths] + [(t, "false") for t in a.whole]:
        label = f"long-{tokens}-{tiled}"
        res = child(work, "kit", "--work", str(work), "--label", label, "--model", model, "--data", str(data),
                    "--steps", str(a.steps), f"model.max_seq_length={tokens}", f"model.gpu_memory_gib={a.budget:g}",
                    "train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=1",
                    "train.gradient_checkpointing=true", f"train.tiled_mlp={tiled}", "train.sample_prompts=0",
                    "data.eval_ratio=0", *overrides)
        print(json.dumps(res), flush=True)
        rows.append((tokens, res))
    print(f"\n{'tokens':>8} {'MLP':>6} {'peak GiB':>9} {'estimate':>8} {'error':>7} {'tokens/s':>9}"  # with warm-up
          f" {'host RSS':>9} {'offloaded':>9}  (model.gpu_memory_gib={a.budget:g})")
    for tokens, r in rows:
        if "peak_gib" not in r:
            print(f"{tokens:>8} {'-':>6} {r.get('error', 'no result')}")
            continue
        mlp = "tiled" if "MLP tiled" in r["batches"] else "whole"
        est = r["estimate_gib"]
        estimate, error = (f"{est:.2f}", f"{est / r['peak_gib'] - 1:+.1%}") if est else ("-", "-")
        host = r["host_estimate_gib"]
        print(f"{tokens:>8} {mlp:>6} {r['peak_gib']:>9} {estimate:>8} {error:>7} {r['run_tokens_per_s']:>9} "
              f"{r['host_peak_gib']:>9} {f'{host:.2f}' if host else '-':>9}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("out", type=Path)
    d.add_argument("--rows", type=int, default=3000)
    for name in ("prepare", "kit", "direct", "trl", "table"):
        s = sub.add_parser(name)
        s.add_argument("--rows", type=int, default=1500, help="rows of the length mix")
        s.add_argument("--only", nargs="+", choices=list(TABLE), help="table: these rows only")
        s.add_argument("--work", default="/tmp/kitspeed")
        s.add_argument("--label", default=name)
        s.add_argument("--model", help="model folder (default: the random 8B shape built under --work)")
        s.add_argument("--data")
        s.add_argument("--steps", type=int, default=12, help="optimizer steps (kit) or steps (direct)")
        s.add_argument("--profile", type=int, default=0, help="profile optimizer step N+1")
        s.add_argument("--shape", nargs="+", default=["4x2048"], help="direct: ROWSxLENGTH batches, in turn")
        s.add_argument("--ragged", action="store_true", help="direct: rows 60-100%% real, right-padded")
        s.add_argument("--seq", type=int, default=2048)
        s.add_argument("--no-checkpointing", action="store_true")
        s.add_argument("--fp8", action="store_true", help="direct, trl: Unsloth's FP8 base (load_in_fp8) for NF4")
        s.add_argument("--batch", type=int, default=32, help="trl: rows a step (padding-free, one pass)")
    lc = sub.add_parser("long")
    lc.add_argument("--work", default="/tmp/kitlong")
    lc.add_argument("--rows", type=int, default=1500, help="rows of the length mix (prepare, when no --model)")
    lc.add_argument("--model", help="model folder (default: the random 8B shape built under --work)")
    lc.add_argument("--lengths", nargs="+", type=int, default=[32768, 65536, 98304, 131072])
    lc.add_argument("--whole", nargs="*", type=int, default=[], help="these lengths also with train.tiled_mlp=false")
    lc.add_argument("--budget", type=float, default=24, help="model.gpu_memory_gib")
    lc.add_argument("--steps", type=int, default=2, help="optimizer steps a length (past 131,072 tokens a step takes "
                    "minutes: attention grows with the square of the length)")
    a, rest = p.parse_known_args()
    if a.cmd == "data":
        print(json.dumps(make_data(a.out, a.rows)))
    elif a.cmd == "prepare":
        prepare(Path(a.work), a.rows)
    elif a.cmd == "kit":
        print(json.dumps(run_kit(a, rest)), flush=True)
    elif a.cmd == "direct":
        run_direct(a)
    elif a.cmd == "trl":
        print(json.dumps(run_trl(a)), flush=True)
    elif a.cmd == "long":
        long_table(a, rest)
    else:
        table(a)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
