"""`kit eval RUN`: lm-evaluation-harness on a run's model, the base with the run's adapter (lm-eval's HF model
with PEFT), the merged export, or the adapter's base alone (--base: the scores before fine-tuning). Its task
kit_heldout is the run's held-out split written as a local JSONL and scored by exact match and ROUGE-L against the
answers the examples trained toward, so it runs offline; any task lm-eval has installed (or finds under --include)
runs by name beside it.

    kit eval runs/demo                                        # the held-out split
    kit eval runs/demo --tasks kit_heldout,hellaswag --limit 100 --merged
    kit eval runs/demo --base                                 # the same, on the base model without the adapter

Each task's latest scores land in RUN/eval/<model>.json (adapter.json, merged16.json, base.json), with lm-eval's
samples per task beside it, and under manifest.json's "evaluation" (keyed the same), so base and fine-tune sit side
by side. Every model is asked in the run's chat format (the tokenizer the run saved: its template, its stop tokens).
RUN/eval/kit_heldout.yaml is an lm-eval task file: `lm_eval --include_path RUN/eval --tasks kit_heldout ...` runs
the same task.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import time
from pathlib import Path
from typing import Optional

import yaml

from kit.config.load import load_config
from kit.core.errors import EvalError, SetupError, install_extras
from kit.core.io import atomic_write_text, write_json
from kit.data.heldout import held_out
from kit.models import hub
from kit.models.hub import base_config
from kit.models.template import chat_format
from kit.run.rundir import CONFIG, MANIFEST, RunDir, read_adapter, read_manifest, record_evaluation

TASK = "kit_heldout"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--tasks", type=_tasks, default=TASK,
                   help=f"comma-separated lm-eval tasks: {TASK} (the run's held-out split, exact match and ROUGE-L "
                        "against its answers; the default) and any installed task by name")
    p.add_argument("--limit", type=_count, help="evaluate at most N examples of each task")
    p.add_argument("--merged", action="store_true", help="the merged export (kit export --to merged16), not the base "
                                                         "with the adapter")
    p.add_argument("--base", action="store_true", help="the adapter's base model alone (no adapter), asked the same "
                                                       "way: the scores before fine-tuning, recorded as 'base'")
    p.add_argument("--max-new-tokens", type=_count, default=256, help=f"longest answer in {TASK} (default 256)")
    p.add_argument("--batch-size", type=_batch, default="8", help="lm-eval's batch size: a number or auto (default 8)")
    p.add_argument("--chat-template", action="store_true", help=f"ask the named tasks through the run's chat "
                                                                f"template ({TASK} always is)")
    p.add_argument("--include", action="append", default=[], metavar="DIR",
                   help="a folder of your own lm-eval task YAML files (repeatable)")


def _count(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of 1 or more")
    return int(text)


def _tasks(text: str) -> list[str]:
    """--tasks as names, each once; `--tasks ,` names none, which would evaluate nothing and succeed."""
    tasks = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not tasks:
        raise argparse.ArgumentTypeError(f"'{text}' names no task; give comma-separated lm-eval task names, e.g. "
                                         f"{TASK},hellaswag ({TASK}: the run's held-out split)")
    return tasks


def _batch(text: str) -> str:
    if text != "auto" and (not text.strip().isdigit() or int(text) < 1):
        raise argparse.ArgumentTypeError(f"'{text}' is neither a whole number of 1 or more nor auto")
    return text


def run_cli(args) -> int:
    report = evaluate(Path(args.run_dir), args.tasks, args.limit, args.merged, args.max_new_tokens, args.batch_size,
                      args.chat_template, [Path(d) for d in args.include], base=args.base)
    print(render(report))
    return 0


def evaluate(run_dir: Path, tasks: list[str], limit: Optional[int] = None, merged: bool = False,
             max_new_tokens: int = 256, batch_size: str = "8", chat_template: bool = False,
             include: list[Path] = (), base: bool = False) -> dict:
    """Run `tasks` on the run's model (`merged`: the merged export; `base`: the adapter's base alone) and record
    each one's scores (RUN/eval/<model>.json, the manifest); returns what render() shows."""
    if merged and base:
        raise EvalError("--base and --merged name two different models: --base scores the adapter's base model "
                        "without the adapter (the scores before fine-tuning), --merged the merged export. Give one "
                        "of them, in two kit eval commands to record both.")
    run = RunDir(Path(run_dir))
    if not run.manifest.is_file() or not run.config.is_file():
        raise EvalError(f"{run.path}: not a trained run (no {MANIFEST} and {CONFIG}). Train it first "
                        "(kit train ...), or check the path.")
    source, model_args = _model(run, merged, base)
    lm_eval, tm_class, hflm = _lm_eval()
    named = [t for t in tasks if t != TASK]
    # lm-eval's index of its installed tasks takes a while to build: only for named tasks
    manager = tm_class(include_path=[str(d) for d in include] or None, include_defaults=bool(named))
    if unknown := [t for t in named if t not in manager.all_tasks]:
        raise EvalError(" ".join(f"--tasks: '{t}' is not an installed lm-eval task{_closest(t, manager.all_tasks)}."
                                 for t in unknown) + " `lm_eval ls tasks` lists them; folders of your own task "
                                                     "files go in with --include.")
    specs = {t: t for t in named}
    if TASK in tasks:
        specs[TASK] = str(write_task(run, model_args["tokenizer"], max_new_tokens))  # lm-eval loads it by path
    import torch
    cuda = torch.cuda.is_available()
    lm = hflm(**model_args, dtype="auto" if cuda else "float32", device="cuda" if cuda else "cpu",
              batch_size=batch_size)
    # the held-out prompts are already in the chat format; the named tasks' only with --chat-template
    groups = [[t for t in tasks if t == TASK or not chat_template], [t for t in named if chat_template]]
    results, samples = {}, {}
    for group, chat in zip(groups, (False, True)):
        if not group:
            continue
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=[specs[t] for t in group], limit=limit, task_manager=manager,
                                          apply_chat_template=chat, log_samples=True)
        except ConnectionError as e:  # datasets' word for a Hub dataset neither cached nor reachable
            raise EvalError(f"--tasks {','.join(group)}: a task's dataset could not be downloaded ({e}). lm-eval's "
                            "tasks read theirs from the Hugging Face Hub: run them once where there is network (the "
                            f"datasets are cached for later), or evaluate {TASK} alone, which needs none.") from None
        results.update(out["results"])
        samples.update(out["samples"])
    run.eval.mkdir(exist_ok=True)
    date, model = time.strftime("%Y-%m-%d %H:%M:%S"), {k: str(v) for k, v in model_args.items()}
    record = {}
    for task, result in results.items():  # a group's subtasks have results and samples, the group results only
        record[task] = {"scores": _scores(result), "limit": limit, "date": date, "lm_eval": lm_eval.__version__,
                        "model": model}
        if task in samples:
            path = run.eval / f"{source}-{task}.jsonl"
            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=_plain) + "\n"
                                            for r in samples[task]))
            record[task]["samples"] = str(path.relative_to(run.path))
    results_file = run.eval / f"{source}.json"
    # each task's latest evaluation of this model: one kit eval adds to what the earlier ones recorded
    evaluated = {**(json.loads(results_file.read_text(encoding="utf-8")) if results_file.is_file() else {}), **record}
    write_json(results_file, evaluated)
    record_evaluation(run, source, evaluated)
    return {"run": str(run.path), "source": source, "limit": limit, "results": str(results_file),
            "tasks": {t: r["scores"] for t, r in record.items()}}


def _lm_eval():
    try:
        import lm_eval
        import rouge_score  # noqa: F401 - kit_heldout's ROUGE-L
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise SetupError(f"kit eval needs lm-evaluation-harness and rouge_score ({e.name} is not installed): "
                         f"{install_extras('lm_eval and rouge_score')}.") from None
    return lm_eval, TaskManager, HFLM


def _model(run: RunDir, merged: bool, base: bool = False) -> tuple[str, dict]:
    """('adapter', 'merged16' or 'base', lm-eval's HF model arguments). Each is asked through the tokenizer the run
    saved beside its adapter (the run's chat template and stop tokens), the merged export too: the template an
    export carries is not necessarily the one the run trained with."""
    if merged:
        if not (run.merged16 / "config.json").is_file():
            raise EvalError(f"--merged: {run.merged16} holds no merged export. Write it with "
                            f"kit export {run.path} --to merged16, or evaluate the adapter (without --merged).")
        folder = str(run.merged16.resolve())
        tokenizer = run.adapter if (run.adapter / "tokenizer_config.json").is_file() else run.merged16
        return "merged16", {"pretrained": folder, "tokenizer": str(tokenizer.resolve())}
    adapter = read_adapter(run.path)
    adapter.check_fits(base_config(adapter.base), adapter.base)
    hub.check_model(adapter.base, "the adapter's base_model_name_or_path")
    folder = str(adapter.path.resolve())
    if base:
        return "base", {"pretrained": adapter.base, "tokenizer": folder}
    return "adapter", {"pretrained": adapter.base, "peft": folder, "tokenizer": folder}


def write_task(run: RunDir, tokenizer_path: str, max_new_tokens: int) -> Path:
    """RUN/eval/heldout.jsonl (the run's eval split as prompt, question, reference) and kit_heldout.yaml, the
    lm-eval task that reads it (returned). The split is made again from the run's config, as training made it."""
    from transformers import AutoTokenizer

    from kit.data.load import load_data
    cfg = load_config(run.config)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    data = load_data(cfg, tokenizer)
    trained = read_manifest(run)["dataset"]["fingerprint"]
    if data.train.fingerprint != trained:
        raise EvalError(f"{TASK}: the data of {run.config} is not what the run trained on (fingerprint "
                        f"{data.train.fingerprint}, the manifest says {trained}), so its held-out split would not be "
                        "the one held out. Restore the data, or name other tasks with --tasks.")
    examples = held_out(data.eval.dataset, tokenizer) if data.eval else []
    if not examples:
        raise EvalError(f"{TASK}: {run.path} held out no examples (data.eval_ratio=0, or train.eval_strategy=no). "
                        "Name installed lm-eval tasks with --tasks, or train with a held-out split.")
    run.eval.mkdir(exist_ok=True)
    heldout = run.eval / "heldout.jsonl"
    atomic_write_text(heldout, "".join(json.dumps(dataclasses.asdict(e), ensure_ascii=False) + "\n"
                                       for e in examples))
    task = {"task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(heldout.resolve())}},
            "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{reference}}", "target_delimiter": "",
            "generation_kwargs": {"until": chat_format(tokenizer).stops, "do_sample": False,
                                  "max_gen_toks": max_new_tokens},
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("exact_match", "rougeL")],
            "metadata": {"version": 1, "run": str(run.path.resolve())}}
    path = run.eval / f"{TASK}.yaml"
    atomic_write_text(path, yaml.safe_dump(task, sort_keys=False, allow_unicode=True)
                      + f"process_results: !function {__name__}.scores\n")
    return path


class _Words:
    """rouge_score's default tokenizer keeps only ASCII letters and digits, which leaves Korean empty: ROUGE-L
    here is over whitespace-separated words."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return text.split()


def scores(doc: dict, results: list[str]) -> dict[str, float]:
    """kit_heldout's process_results: lm-eval's exact match and ROUGE-L F1 of the answer against the reference."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from rouge_score.rouge_scorer import RougeScorer
    answer, reference = results[0].strip(), doc["reference"].strip()
    exact = exact_match_hf_evaluate(predictions=[answer], references=[reference])["exact_match"]
    rouge = RougeScorer(["rougeL"], tokenizer=_Words()).score(reference, answer)["rougeL"].fmeasure
    return {"exact_match": float(exact), "rougeL": float(rouge)}


def _scores(result: dict) -> dict:
    """lm-eval's 'metric,filter' keys as metric names (the filter where it is not 'none')."""
    out = {}
    for key, value in result.items():
        if "," in key and isinstance(value, (int, float)):
            metric, flt = key.split(",", 1)
            out[metric if flt == "none" else key] = value
    return out


def _plain(value):
    """What json cannot write as it is (numpy numbers, tuples in lm-eval's samples) as plain values."""
    return value.item() if hasattr(value, "item") else str(value)


def _closest(name: str, names: list[str]) -> str:
    best = difflib.get_close_matches(name, names, n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(b) for b in best)}?" if best else ""


def render(report: dict) -> str:
    lines = [f"kit eval {report['run']} ({report['source']}"
             + (f", at most {report['limit']} examples per task)" if report["limit"] else ")")]
    for task, values in report["tasks"].items():
        for metric, value in values.items():
            if not metric.endswith("_stderr"):
                stderr = values.get(f"{metric}_stderr")
                lines.append(f"  {task:<20} {metric:<16} {value:.4f}"
                             + (f"  ± {stderr:.4f}" if isinstance(stderr, float) else ""))
    return "\n".join(lines + [f"results: {report['results']}"])
