"""kit eval: lm-evaluation-harness on a run's model, offline; the held-out split as a local task, scored by exact
match and ROUGE-L, and lm-eval tasks by name."""
import json
import subprocess
import sys
from statistics import mean

import pytest
import yaml

from kit.core.errors import EvalError
from kit.eval import evaluation
from tests.helpers import make_default


def _rouge_l(reference: str, answer: str) -> float:
    """ROUGE-L F1 over whitespace-separated words, written out here (not the kit's scorer): the longest common
    subsequence's share of the answer (precision) and of the reference (recall)."""
    ref, ans = reference.split(), answer.split()
    lcs = [[0] * (len(ans) + 1) for _ in range(len(ref) + 1)]
    for i, r in enumerate(ref):
        for j, a in enumerate(ans):
            lcs[i + 1][j + 1] = lcs[i][j] + 1 if r == a else max(lcs[i][j + 1], lcs[i + 1][j])
    n = lcs[-1][-1]
    return 0.0 if n == 0 else 2 * (n / len(ans)) * (n / len(ref)) / (n / len(ans) + n / len(ref))


def _kit_eval(*args, cwd):
    return subprocess.run([sys.executable, "-m", "kit.cli", "eval", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=900)


def test_scores_are_lm_evals_exact_match_and_rouge_l_over_words():
    scores = evaluation.scores
    assert scores({"reference": "서울입니다."}, [" 서울입니다.\n"]) == {"exact_match": 1.0, "rougeL": 1.0}
    partial = scores({"reference": "서울은 한국의 수도입니다"}, ["서울은 수도입니다"])
    precision, recall = 2 / 2, 2 / 3  # the longest common subsequence: 서울은, 수도입니다
    assert partial == {"exact_match": 0.0, "rougeL": pytest.approx(2 * precision * recall / (precision + recall))}
    assert scores({"reference": "서울"}, ["부산"]) == {"exact_match": 0.0, "rougeL": 0.0}


def test_a_folder_that_is_not_a_trained_run_is_refused_without_a_traceback(tmp_path):
    res = _kit_eval(tmp_path, cwd=tmp_path)
    assert res.returncode == 2 and "not a trained run" in res.stderr and "Traceback" not in res.stderr


def test_merged_without_an_export_names_the_export_command(adapter_run):
    (adapter_run / "manifest.json").write_text("{}")
    res = _kit_eval(adapter_run, "--merged", cwd=adapter_run)
    assert res.returncode == 2 and f"kit export {adapter_run} --to merged16" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.fixture(scope="module")
def evaluated(demo_run):
    run_dir = demo_run[0]
    res = _kit_eval(run_dir, "--limit", 3, "--max-new-tokens", 24, "--batch-size", 1, cwd=run_dir.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir, res


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_eval_scores_the_held_out_split_and_records_it(evaluated):
    from kit.data.rows import SAMPLE, load_rows
    from tests.helpers import question
    run_dir, res = evaluated
    manifest = json.loads((run_dir / "manifest.json").read_text())
    recorded = json.loads((run_dir / "eval/adapter.json").read_text())
    assert manifest["evaluation"]["adapter"] == recorded
    summary = recorded["kit_heldout"]
    assert summary["limit"] == 3 and summary["model"]["peft"] == str((run_dir / "adapter").resolve())
    heldout = _lines(run_dir / "eval/heldout.jsonl")
    answers = {question(row): row["output"] for row in load_rows(SAMPLE)}
    assert len(heldout) == manifest["dataset"]["eval_examples"]
    assert all(answers[h["question"]] == h["reference"] for h in heldout), "the eval split's rows"
    samples = _lines(run_dir / summary["samples"])
    assert len(samples) == 3
    for s in samples:
        answer = s["filtered_resps"][0]
        assert s["arguments"][0][0] == s["doc"]["prompt"]  # as trained, up to the answer's header
        assert s["doc"]["prompt"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        assert s["exact_match"] == float(answer.strip() == s["doc"]["reference"].strip())
        assert s["rougeL"] == pytest.approx(_rouge_l(s["doc"]["reference"], answer))
    scores = summary["scores"]
    assert scores["exact_match"] == pytest.approx(mean(s["exact_match"] for s in samples))
    assert scores["rougeL"] == pytest.approx(mean(s["rougeL"] for s in samples))
    assert "kit_heldout" in res.stdout and "rougeL" in res.stdout


@pytest.mark.slow
def test_eval_answers_are_the_adapters_greedy_answers(evaluated):
    from kit.eval.infer import load_adapter_model
    from tests.helpers import decided_greedy_text
    run_dir, _ = evaluated
    model, tokenizer = load_adapter_model(run_dir)
    samples = _lines(run_dir / "eval/adapter-kit_heldout.jsonl")
    decided = [decided_greedy_text(model, tokenizer, [{"role": "user", "content": s["doc"]["question"]}], 24,
                                   tolerance=0.01) for s in samples]
    for s, expected in zip(samples, decided):  # lm-eval's own model and batching: equal up to a near-tie
        assert s["filtered_resps"][0].startswith(expected)
    assert any(decided), "tokens decided clearly enough to compare"


@pytest.mark.slow
def test_an_installed_task_runs_by_name_through_the_chat_template(demo_run, tmp_path):
    from tests.helpers import question, train_rows
    run_dir = demo_run[0]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = train_rows(run_dir).select(range(2))  # questions the demo was trained to answer
    data = tasks / "capitals.jsonl"
    data.write_text("".join(json.dumps({"question": question(r), "answer": r["output"]}, ensure_ascii=False) + "\n"
                            for r in rows), encoding="utf-8")
    spec = {"test_split": "test", "output_type": "generate_until", "doc_to_text": "{{question}}",
            "doc_to_target": "{{answer}}", "generation_kwargs": {"until": ["<|eot_id|>"], "max_gen_toks": 48},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    (tasks / "capitals.yaml").write_text(yaml.safe_dump({
        "task": "kit_test_capitals", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        **spec}), encoding="utf-8")
    (tasks / "hub.yaml").write_text(yaml.safe_dump({"task": "kit_test_hub", "dataset_path": "kit-test/not-cached",
                                                    **spec}), encoding="utf-8")
    with pytest.raises(EvalError, match="'kit_test_capitls' is not an installed lm-eval task; did you mean "
                                        "'kit_test_capitals'"):
        evaluation.evaluate(run_dir, ["kit_test_capitls"], include=[tasks])
    with pytest.raises(EvalError, match="kit_test_hub: a task's dataset could not be downloaded .* run them once "
                                        "where there is network"):
        evaluation.evaluate(run_dir, ["kit_test_hub"], limit=1, include=[tasks])  # the Hub is offline (conftest)
    res = _kit_eval(run_dir, "--tasks", "kit_test_capitals", "--include", tasks, "--chat-template", "--batch-size", 1,
                    cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    recorded = json.loads((run_dir / "eval/adapter.json").read_text())
    samples = _lines(run_dir / recorded["kit_test_capitals"]["samples"])
    for s, row in zip(samples, rows):
        context = s["arguments"][0][0]
        assert context.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
        assert context.endswith(f"{question(row)}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    from kit.eval.infer import load_adapter_model
    from tests.helpers import decided_greedy_text
    model, tokenizer = load_adapter_model(run_dir)  # the first trained question gets its trained answer (test_train),
    decided = decided_greedy_text(model, tokenizer, [{"role": "user", "content": question(rows[0])}], 48, 0.01)
    assert decided and rows[0]["output"].startswith(decided)  # equal up to a near-tie (tests/helpers.py)
    assert samples[0]["filtered_resps"][0].startswith(decided)
    assert samples[0]["exact_match"] == 1.0 or decided != rows[0]["output"]
    assert recorded["kit_test_capitals"]["scores"]["exact_match"] == mean(s["exact_match"] for s in samples)
    assert json.loads((run_dir / "manifest.json").read_text())["evaluation"]["adapter"] == recorded


def test_base_and_merged_together_are_refused_with_what_each_means(adapter_run):
    res = _kit_eval(adapter_run, "--base", "--merged", cwd=adapter_run)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--base and --merged name two different models" in res.stderr and "Give one of them" in res.stderr


def test_eval_refuses_data_that_changed_since_training(adapter_run, tmp_path):
    """The README's promise: the held-out split is made again from the run's data, so data that changed since
    training (its fingerprint) is refused before any model loads."""
    from kit.config.load import load_config, to_yaml
    from kit.data.load import load_data
    from kit.data.rows import SAMPLE_FILE
    from kit.models.template import load_tokenizer
    from kit.run.rundir import RunDir
    data = tmp_path / "data.jsonl"
    data.write_text(SAMPLE_FILE.read_text(encoding="utf-8"), encoding="utf-8")
    cfg = load_config("demo", [f"data.path={data}"])
    (adapter_run / "config.yaml").write_text(to_yaml(cfg))
    trained = load_data(cfg, load_tokenizer("bundled")).train.fingerprint
    (adapter_run / "manifest.json").write_text(json.dumps({"dataset": {"fingerprint": trained}}))
    assert evaluation.write_task(RunDir(adapter_run), str(adapter_run / "adapter"), 16).is_file(), "the data trained"
    data.write_text(data.read_text(encoding="utf-8").replace('"output": "', '"output": "답: '), encoding="utf-8")
    res = _kit_eval(adapter_run, cwd=adapter_run)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"kit_heldout: the data of {adapter_run / 'config.yaml'} is not what the run trained on (fingerprint " \
           in res.stderr and f"the manifest says {trained}" in res.stderr


# The done-when of issue 25's "quality, measured": on a real model (the shipped smollm2 recipe, trained once per
# session), the held-out split's ROUGE-L of the fine-tune is at least 10 points above the base model's.

@pytest.fixture(scope="module")
def smollm2_scored(smollm2_run, tmp_path_factory):
    """A copy of the session's smollm2 run (its record is shared), scored by `kit eval --base` and `kit eval` with
    make demo's answer length and batch (DEMO_COMPARE)."""
    import shutil
    run_dir = tmp_path_factory.mktemp("scored") / "smollm2"
    shutil.copytree(smollm2_run[0], run_dir)
    for args in (["--base"], []):
        res = _kit_eval(run_dir, *args, *make_default("DEMO_COMPARE"), cwd=run_dir.parent)
        assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_the_manifest_holds_base_and_fine_tune_side_by_side(smollm2_scored):
    run_dir = smollm2_scored
    evaluation_ = json.loads((run_dir / "manifest.json").read_text())["evaluation"]
    assert set(evaluation_) == {"base", "adapter"}
    for source in ("base", "adapter"):
        assert evaluation_[source] == json.loads((run_dir / f"eval/{source}.json").read_text())
    base, tuned = (evaluation_[s]["kit_heldout"] for s in ("base", "adapter"))
    assert "peft" not in base["model"] and base["model"]["pretrained"] == tuned["model"]["pretrained"]
    assert base["model"]["tokenizer"] == tuned["model"]["peft"] == str((run_dir / "adapter").resolve())
    assert base["limit"] is None and tuned["limit"] is None  # the whole held-out split
    base, tuned = base["scores"], tuned["scores"]
    assert base["rougeL"] < 0.25, "an untrained model cannot pass: its answers are far from the references"
    assert tuned["rougeL"] >= base["rougeL"] + 0.10, (base, tuned)
    assert tuned["exact_match"] >= base["exact_match"]


@pytest.mark.slow
def test_the_held_out_prompts_and_stops_are_the_runs_chat_format(smollm2_scored):
    task = yaml.safe_load((smollm2_scored / "eval/kit_heldout.yaml").read_text().split("process_results:")[0])
    assert task["generation_kwargs"]["until"] == ["<|im_end|>", "<|endoftext|>"]  # ChatML's, not Llama 3.1's
    for source in ("base", "adapter"):
        for s in _lines(smollm2_scored / f"eval/{source}-kit_heldout.jsonl"):
            assert s["arguments"][0][0] == s["doc"]["prompt"]
            assert s["doc"]["prompt"].startswith("<|im_start|>user\n")
            assert s["doc"]["prompt"].endswith(f"{s['doc']['question']}<|im_end|>\n<|im_start|>assistant\n")
            assert "<|im_end|>" not in s["filtered_resps"][0]


@pytest.mark.slow
def test_the_fine_tune_answers_a_held_out_question_closer_to_its_reference(smollm2_scored):
    from kit.eval.compare import side_by_side
    shown = side_by_side(smollm2_scored)  # what kit compare shows (make demo): the question of the median gain
    base, tuned = shown["answers"]["base"], shown["answers"]["adapter"]
    assert tuned["text"].strip() != base["text"].strip()
    assert tuned["rougeL"] > base["rougeL"]
    heldout = _lines(smollm2_scored / "eval/heldout.jsonl")[shown["example"] - 1]
    assert (shown["question"], shown["reference"]) == (heldout["question"], heldout["reference"])
    # and over the split: the fine-tune is closer on most questions, never farther on many
    pairs = [(b["rougeL"], a["rougeL"]) for b, a in zip(*(
        _lines(smollm2_scored / f"eval/{s}-kit_heldout.jsonl") for s in ("base", "adapter")))]
    assert sum(a > b for b, a in pairs) > len(pairs) / 2 and sum(a < b for b, a in pairs) <= len(pairs) / 4


@pytest.mark.slow
def test_chat_template_asks_named_tasks_in_the_runs_chat_format(smollm2_scored, tmp_path):
    from tests.helpers import question, train_rows
    rows = train_rows(smollm2_scored).select(range(2))
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": question(r), "answer": r["output"]}, ensure_ascii=False) + "\n"
                            for r in rows), encoding="utf-8")
    (tmp_path / "questions.yaml").write_text(yaml.safe_dump({
        "task": "kit_test_questions", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}", "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 24},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}), encoding="utf-8")
    res = _kit_eval(smollm2_scored, "--tasks", "kit_test_questions", "--include", tmp_path, "--chat-template",
                    "--batch-size", 2, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    recorded = json.loads((smollm2_scored / "eval/adapter.json").read_text())
    for s, row in zip(_lines(smollm2_scored / recorded["kit_test_questions"]["samples"]), rows):
        assert s["arguments"][0][0] == f"<|im_start|>user\n{question(row)}<|im_end|>\n<|im_start|>assistant\n"
        assert "<|im_end|>" not in s["resps"][0][0]  # the run's end of turn stopped it


@pytest.mark.slow
def test_compare_shows_one_question_above_the_other_and_both_scores(smollm2_scored):
    res = subprocess.run([sys.executable, "-m", "kit.cli", "compare", str(smollm2_scored), "--example", "2",
                          "--max-new-tokens", "48"], cwd=smollm2_scored.parent, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    recorded = {s: json.loads((smollm2_scored / f"eval/{s}.json").read_text())["kit_heldout"]["scores"]
                for s in ("base", "adapter")}
    question = _lines(smollm2_scored / "eval/heldout.jsonl")[1]["question"]
    assert f"held-out question 2 of {len(_lines(smollm2_scored / 'eval/heldout.jsonl'))}" in out
    assert question.splitlines()[0] in out
    assert out.index("  base ") < out.index("  fine-tuned ")  # one above the other
    for source, name in (("base", "base"), ("adapter", "fine-tuned")):
        assert f"  {name:<12}{recorded[source]['rougeL']:>8.4f}  {recorded[source]['exact_match']:>11.4f}" in out
    res = subprocess.run([sys.executable, "-m", "kit.cli", "compare", str(smollm2_scored), "--example", "99"],
                         cwd=smollm2_scored.parent, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--example 99: the run held out 14 examples; give 1 to 14" in res.stderr
