"""DPO speed on one CUDA GPU, side by side in one call: the kit's dpo recipe, Unsloth's patched DPOTrainer as its
notebooks set it up (Unsloth in TRL), and TRL + PEFT + bitsandbytes without Unsloth, on the same preference pairs
and the same random-weight Llama-3.1-8B shape (QLoRA nf4, LoRA r=16 on the 7 projections, beta 0.1, bf16,
4 pairs x 2 accumulation a step, max_length 2048). Reports steady pairs/s and peak GPU memory (docs/benchmarks.md).

    python bench/dpo_speed.py table --work /tmp/kitdpo     # every row, one subprocess each
    python bench/dpo_speed.py kit --work W --label NAME [key=value ...]   # one row -> one JSON line
    python bench/dpo_speed.py unsloth --work W             # Unsloth's FastLanguageModel + PatchDPOTrainer + TRL
    python bench/dpo_speed.py peft --work W                # transformers + bitsandbytes + PEFT + TRL's DPOTrainer

Steady = pairs between the end of optimizer step 2 and the end of the last step, over the time between them.
Each side (chosen, rejected) of a pair is a log-normal answer length (median 200 tokens) after a Korean question.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from train_speed import PROJECTIONS, stitched

BATCH, ACCUM, BETA, LR, MAX_LENGTH = 4, 2, 0.1, 5e-6, 2048
MEDIAN_ANSWER, SIGMA, CAP = 200, 0.7, 900


def make_pairs(out: Path, rows: int, seed: int = 0) -> dict:
    """TRL's conversational pairs (prompt, chosen, rejected as messages), answers stitched from the sample set."""
    from kit.data.rows import SAMPLE_FILE
    from kit.models.template import load_tokenizer
    tok = load_tokenizer("bundled")
    sample = [json.loads(line) for line in SAMPLE_FILE.read_text(encoding="utf-8").splitlines()]
    rng = random.Random(seed)

    def answer() -> tuple[str, int]:
        need = int(min(rng.lognormvariate(math.log(MEDIAN_ANSWER), SIGMA), CAP))
        return stitched(tok, sample, rng, need), need

    sides = []
    with open(out, "w", encoding="utf-8") as f:
        for _ in range(rows):
            (chosen, n1), (rejected, n2) = answer(), answer()
            sides += [n1, n2]
            f.write(json.dumps({"prompt": [{"role": "user", "content": rng.choice(sample)["instruction"]}],
                                "chosen": [{"role": "assistant", "content": chosen}],
                                "rejected": [{"role": "assistant", "content": rejected}]}, ensure_ascii=False) + "\n")
    sides.sort()
    return {"pairs": rows, "answer_tokens_median": sides[len(sides) // 2], "answer_tokens_max": sides[-1]}


def prepare(work: Path, rows: int) -> tuple[Path, Path]:
    work.mkdir(parents=True, exist_ok=True)
    data = work / "pairs.jsonl"
    if not data.exists():
        print(json.dumps({"data": str(data), **make_pairs(data, rows)}), flush=True)
    from kit.models.tiny import build_random_model
    return data, build_random_model("8b", 0, work / "base-8b")


def steady(times: list[float], pairs_per_step: int) -> dict:
    """times: the end of each optimizer step (perf_counter)."""
    if len(times) < 4:
        return {"error": f"only {len(times)} steps timed"}
    return {"steady_pairs_per_s": round(pairs_per_step * (len(times) - 2) / (times[-1] - times[1]), 3),
            "s_per_step": round((times[-1] - times[1]) / (len(times) - 2), 3), "steps": len(times)}


# ---------------------------------------------------------------- the kit

def run_kit(a, overrides: list[str]) -> dict:
    from kit.recipes.dpo import main
    from kit.run.rundir import RunDir, read_manifest, read_metrics
    runs = Path(a.work) / "runs"
    rc = main(["--config", "dpo", f"model.name={a.model}", f"data.path={a.data}", f"train.max_steps={a.steps}",
               f"train.per_device_train_batch_size={BATCH}", f"train.gradient_accumulation_steps={ACCUM}",
               f"train.beta={BETA}", f"train.learning_rate={LR}", f"model.max_seq_length={MAX_LENGTH}",
               "train.logging_steps=1", "train.eval_strategy=no", "train.save_strategy=no", "data.eval_ratio=0",
               "train.sample_prompts=0", f"run.output_dir={runs}", f"run.name={a.label}", "run.overwrite=true",
               *overrides])
    if rc != 0:
        return {"label": a.label, "error": f"recipe exited {rc}"}
    run = RunDir(runs / a.label)
    rows = [m for m in read_metrics(run.metrics) if "loss" in m and "train_runtime" in m]
    first = next(m for m in rows if m["step"] >= 2)
    result = read_manifest(run)["result"]
    rate = BATCH * ACCUM * (rows[-1]["step"] - first["step"]) / (rows[-1]["train_runtime"] - first["train_runtime"])
    return {"label": a.label, "overrides": overrides, "steady_pairs_per_s": round(rate, 3),
            "steady_steps": [first["step"], rows[-1]["step"]], "peak_gib": round(result["peak_gib"], 2),
            "estimate_gib": result.get("estimate_gib"), "batches": result.get("batches"),
            "losses": [round(m["loss"], 4) for m in rows]}


# ---------------------------------------------------------------- the peers

def peer_config(a, **extra):
    from trl import DPOConfig
    return DPOConfig(output_dir=str(Path(a.work) / "peer-out" / a.label), per_device_train_batch_size=BATCH,
                     gradient_accumulation_steps=ACCUM, max_steps=a.steps, learning_rate=LR, beta=BETA,
                     max_length=MAX_LENGTH, bf16=True, logging_steps=1, save_strategy="no", report_to=[],
                     lr_scheduler_type="linear", warmup_steps=0, seed=0, **extra)


def timed_train(a, trainer) -> dict:
    import torch
    from transformers import TrainerCallback

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            times.append(time.perf_counter())

    trainer.add_callback(Clock())
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    return {"label": a.label, **steady(times, BATCH * ACCUM),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "losses": losses}


def run_unsloth(a) -> dict:
    """As Unsloth's DPO notebook: PatchDPOTrainer, FastLanguageModel in 4-bit, its offloaded checkpointing."""
    from unsloth import FastLanguageModel, PatchDPOTrainer  # before TRL, as Unsloth asks
    PatchDPOTrainer()
    import torch
    from datasets import load_dataset
    from trl import DPOTrainer
    model, tok = FastLanguageModel.from_pretrained(model_name=a.model, max_seq_length=MAX_LENGTH,
                                                   dtype=torch.bfloat16, load_in_4bit=True,
                                                   use_exact_model_name=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                                             target_modules=PROJECTIONS, use_gradient_checkpointing="unsloth",
                                             random_state=0, max_seq_length=MAX_LENGTH)
    data = load_dataset("json", data_files=a.data, split="train")
    trainer = DPOTrainer(model=model, ref_model=None, args=peer_config(a), train_dataset=data, processing_class=tok)
    return timed_train(a, trainer)


def run_peft(a) -> dict:
    """transformers + bitsandbytes nf4 + PEFT's LoRA through TRL's peft_config, gradient checkpointing on."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOTrainer
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=quant, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", device_map={"": 0})
    tok = AutoTokenizer.from_pretrained(a.model)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJECTIONS, task_type="CAUSAL_LM")
    data = load_dataset("json", data_files=a.data, split="train")
    trainer = DPOTrainer(model=model, args=peer_config(a, gradient_checkpointing=True), train_dataset=data,
                         processing_class=tok, peft_config=lora)
    return timed_train(a, trainer)


# ---------------------------------------------------------------- the table

TABLE = {  # label: (kind, extra recipe overrides for kit rows)
    "kit-dpo": ("kit", []),
    "kit-dpo-24gib": ("kit", ["model.gpu_memory_gib=24"]),
    "unsloth-in-trl": ("unsloth", []),
    "trl-peft": ("peft", []),
}


def child(work: Path, *args: str) -> dict:
    """One row in a fresh process (its own CUDA context and peak); its last JSON line."""
    label = args[args.index("--label") + 1]
    log = work / f"{label}.log"
    with open(log, "w") as fh:
        subprocess.run([sys.executable, __file__, *args], cwd=work, stdout=fh, stderr=subprocess.STDOUT)
    lines = log.read_text(errors="replace").splitlines()
    result = next((json.loads(line) for line in reversed(lines) if line.startswith('{"label"')), None)
    return result or {"label": label, "error": f"no result; see {log}", "tail": lines[-15:]}


def table(a) -> None:
    work = Path(a.work)
    data, model = prepare(work, a.rows)
    rows = []
    for label in a.only or TABLE:
        kind, extra = TABLE[label]
        res = child(work, kind, "--work", str(work), "--label", label, "--model", str(model), "--data", str(data),
                    "--steps", str(a.steps), *extra)
        print(json.dumps(res), flush=True)
        rows.append(res)
    rate = {r["label"]: r.get("steady_pairs_per_s") for r in rows}
    print(f"\n{'run':<16} {'pairs/s':>8} {'vs unsloth-in-trl':>17} {'vs trl-peft':>11} {'peak GiB':>9}")
    for r in rows:
        mine = r.get("steady_pairs_per_s")
        ratios = [f"{mine / rate[k]:.2f}x" if mine and rate.get(k) else "-" for k in ("unsloth-in-trl", "trl-peft")]
        print(f"{r['label']:<16} {mine or '-':>8} {ratios[0]:>17} {ratios[1]:>11} {r.get('peak_gib', '-'):>9}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("table", "kit", "unsloth", "peft"):
        s = sub.add_parser(name)
        s.add_argument("--work", default="/tmp/kitdpo")
        s.add_argument("--label", default=name)
        s.add_argument("--rows", type=int, default=256, help="pairs written by prepare")
        s.add_argument("--only", nargs="+", choices=list(TABLE), help="table: these rows only")
        s.add_argument("--model", help="model folder (default: the random 8B shape under --work)")
        s.add_argument("--data")
        s.add_argument("--steps", type=int, default=14, help="optimizer steps")
    a, rest = p.parse_known_args()
    if a.cmd == "table":
        table(a)
        return
    if not a.model or not a.data:
        a.data, a.model = map(str, prepare(Path(a.work), a.rows))
    run = {"kit": lambda: run_kit(a, rest), "unsloth": lambda: run_unsloth(a), "peft": lambda: run_peft(a)}
    print(json.dumps(run[a.cmd]()), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
