"""`kit compare RUN`: what fine-tuning changed, on the run's held-out split. kit eval's task kit_heldout runs on the
adapter's base alone and on the base with the adapter (recorded as `kit eval RUN --base` and `kit eval RUN` record
them: eval/base.json, eval/adapter.json, the manifest's "evaluation"); then one held-out question is shown with the
answer it trained toward and the two models' answers, one above the other, and the two models' scores over the whole
split. The question shown is a typical one, not the best: the one whose ROUGE-L gain is the median of the split's
(the lower one of an even count), unless --example names another.

    kit compare runs/smollm2                  # the question of the median gain
    kit compare runs/smollm2 --example 3      # the third held-out question

The answers shown are lm-eval's own (its per-example samples), the ones the scores were computed on.
"""
from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Optional

from kit.core.errors import EvalError
from kit.eval.evaluation import TASK, _batch, _count, evaluate
from kit.run.rundir import RunDir, read_manifest

MODELS = {"base": "base", "adapter": "fine-tuned"}  # kit eval's names of the two models -> what compare calls them
SHOWN = 300, 6  # characters, lines of an answer shown (an untrained model may ramble up to --max-new-tokens)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--example", type=_count, help="which held-out question to show (1: the first; default: the one "
                                                  "whose ROUGE-L gain is the split's median)")
    p.add_argument("--max-new-tokens", type=_count, default=256, help=f"longest answer in {TASK} (default 256)")
    p.add_argument("--batch-size", type=_batch, default="8", help="lm-eval's batch size: a number or auto (default 8)")


def run_cli(args) -> int:
    print(render(compare(Path(args.run_dir), args.example, args.max_new_tokens, args.batch_size)))
    return 0


def compare(run_dir: Path, example: Optional[int] = None, max_new_tokens: int = 256, batch_size: str = "8") -> dict:
    """kit_heldout on the base and on the fine-tune (each recorded as kit eval records it), then side_by_side();
    returns what render() shows."""
    run = RunDir(Path(run_dir))
    if example is not None and run.manifest.is_file():  # before minutes of generation
        held = read_manifest(run).get("dataset", {}).get("eval_examples")
        if held is not None and example > held:
            raise EvalError(f"--example {example}: the run held out {held} examples; give 1 to {held}.")
    for source in MODELS:
        evaluate(run.path, [TASK], max_new_tokens=max_new_tokens, batch_size=batch_size, base=source == "base")
    return side_by_side(run.path, example)


def side_by_side(run_dir: Path, example: Optional[int] = None) -> dict:
    """Held-out example `example` (1-based; None: the one of the median ROUGE-L gain) with the base's and the
    fine-tune's answers and scores, and both models' kit_heldout scores over the split, as the last kit eval of each
    recorded them."""
    run, samples, scores = RunDir(Path(run_dir)), {}, {}
    for source in MODELS:
        results = run.eval / f"{source}.json"
        recorded = json.loads(results.read_text(encoding="utf-8")).get(TASK) if results.is_file() else None
        if recorded is None:
            raise EvalError(f"{run.path}: no {TASK} scores of the {MODELS[source]} model recorded. Run kit compare "
                            f"{run.path} (or kit eval {run.path}{' --base' if source == 'base' else ''}).")
        scores[source] = {m: recorded["scores"][m] for m in ("rougeL", "exact_match")}
        lines = (run.path / recorded["samples"]).read_text(encoding="utf-8").splitlines()
        samples[source] = sorted((json.loads(line) for line in lines), key=lambda s: s["doc_id"])
    count = len(samples["adapter"])
    if len(samples["base"]) != count or any(b["doc"] != a["doc"] for b, a in zip(samples["base"], samples["adapter"])):
        raise EvalError(f"{run.path}: the base's and the fine-tune's {TASK} scores are of different questions (a "
                        f"--limit, or another held-out split). Run kit compare {run.path} to score both again.")
    if example is None:
        gains = sorted(range(count), key=lambda k: samples["adapter"][k]["rougeL"] - samples["base"][k]["rougeL"])
        example, chosen = gains[(count - 1) // 2] + 1, "median"
    elif example > count:
        raise EvalError(f"--example {example}: the run held out {count} examples; give 1 to {count}.")
    else:
        chosen = "asked"
    shown = {source: samples[source][example - 1] for source in MODELS}
    doc = shown["adapter"]["doc"]
    return {"run": str(run.path), "example": example, "chosen": chosen, "examples": count, "question": doc["question"],
            "reference": doc["reference"],
            "answers": {s: {"text": shown[s]["filtered_resps"][0], "rougeL": shown[s]["rougeL"],
                            "exact_match": shown[s]["exact_match"]} for s in MODELS},
            "scores": scores}


def _block(label: str, text: str) -> list[str]:
    text = text.strip().rstrip("\ufffd")  # an answer cut at --max-new-tokens may end inside a character
    lines = [line for part in text.splitlines() or [""] for line in textwrap.wrap(part, 100) or [""]]
    chars, most = SHOWN
    shown, length = [], 0
    for line in lines[:most]:
        if length + len(line) > chars:
            break
        shown.append(line)
        length += len(line)
    if len(shown) < len(lines):
        shown = (shown or [lines[0][:chars]]) + [f"... ({len(text)} characters in all)"]
    return [f"  {label:<12}{shown[0]}"] + [f"  {'':<12}{line}" for line in shown[1:]]


def render(report: dict) -> str:
    n, answers, scores = report["examples"], report["answers"], report["scores"]
    why = " (the median ROUGE-L gain of the split)" if report["chosen"] == "median" else ""
    out = [f"kit compare {report['run']}: held-out question {report['example']} of {n}{why}", ""]
    out += _block("question", report["question"]) + _block("reference", report["reference"]) + [""]
    for source, name in MODELS.items():
        out += _block(name, answers[source]["text"])
        out.append(f"  {'':<12}(ROUGE-L {answers[source]['rougeL']:.2f} against the reference)")
    gain = 100 * (scores["adapter"]["rougeL"] - scores["base"]["rougeL"])
    out += ["", f"{TASK}, all {n} held-out questions (greedy answers against the references):",
            f"  {'':<12}{'ROUGE-L':>8}  {'exact match':>11}"]
    for source, name in MODELS.items():
        s = scores[source]
        out.append(f"  {name:<12}{s['rougeL']:>8.4f}  {s['exact_match']:>11.4f}")
    out += [f"  fine-tuning moved ROUGE-L by {gain:+.1f} points",
            f"recorded in {report['run']}/eval/ (base.json, adapter.json) and its manifest.json's \"evaluation\""]
    return "\n".join(out)
