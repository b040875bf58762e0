"""Preference training (train.method dpo, orpo) on the real small model, SmolLM2-135M-Instruct, on CPU: bad pairs,
ORPO, the pairs' formats and the shipped Korean pairs."""
import json
import os
import re
import subprocess
import sys

import pytest

from kit.config.load import load_config
from kit.core.errors import ConfigError, DataError
from kit.data.preference import load_pairs, prepare_pairs
from kit.data.rows import PAIRS, PAIRS_FILE, SAMPLE_FILE, load_rows

COMMON = dict(system_prompt=None, max_len=256, overlong="drop")


def run_dpo(args, cwd, timeout=1500):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "kit.recipes.dpo", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dpo_demo_run(tmp_path_factory):
    """The shipped dpo_demo recipe, exactly as configured, trained once on CPU (a few minutes)."""
    cwd = tmp_path_factory.mktemp("dpo_demo")
    res = run_dpo(["--config", "dpo_demo", f"run.output_dir={cwd / 'runs'}"], cwd)
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return cwd / "runs" / "dpo_demo", res


def test_dpo_demo_prefers_chosen_on_held_out_pairs(dpo_demo_run):
    run, res = dpo_demo_run
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["method"] == "dpo" and manifest["reference"] == "base with the adapter disabled"
    assert manifest["command"].split()[1:3] == ["-m", "kit.recipes.dpo"], manifest["command"]
    p = manifest["preference"]
    assert p["pairs"] == manifest["dataset"]["eval_examples"] == 28, p
    # the policy's log-ratio against the reference prefers chosen; at the start (policy = reference) it is 0 for
    # every pair, so the untrained model scores 0
    assert p["accuracy"] >= 0.9 > p["start_accuracy"] == 0.0, p
    assert p["policy_logprob_accuracy"] > p["base_logprob_accuracy"], p
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {k for r in rows for k in r}
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= logged, sorted(logged)
    assert "kit: training finished" in res.stdout and "held-out preference accuracy" in res.stdout
    assert (run / "loss.png").is_file() and (run / "adapter" / "adapter_config.json").is_file()
    assert not (run / "adapter" / "ref").exists()  # TRL's frozen copy of the adapter is not saved


def test_bad_pairs_exit_2_with_one_message_each_and_nothing_written(tmp_path):
    good = {"instruction": "하늘은 무슨 색인가요?", "input": "", "chosen": "파란색입니다.", "rejected": "초록색입니다."}
    rows = [good] * 3 + [
        {"instruction": "물은 몇 도에서 끓나요?", "input": "", "chosen": "100도입니다.", "rejected": "100도입니다."},
        {"instruction": "1 더하기 1은?", "input": "", "chosen": "2입니다.", "rejected": " "},
        {"instruction": "2 더하기 2는?", "input": "", "chosen": "", "rejected": "5입니다."},
    ] + [good] * 4
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    runs = tmp_path / "runs"
    res = run_dpo(["--config", "dpo_demo", f"data.path={data}", f"run.output_dir={runs}", "data.eval_ratio=0",
                   "train.eval_strategy=no"], tmp_path, timeout=600)
    assert res.returncode == 2, res.stderr[-3000:]
    err = res.stderr
    assert f"{data}, line 4: chosen equals rejected" in err
    assert f"{data}, line 5: rejected is empty" in err
    assert f"{data}, line 6: chosen is empty" in err
    assert "3 problem(s)" in err and "Traceback" not in err
    assert not [p for p in runs.rglob("*") if p.is_file()]  # no config, manifest, lock, checkpoint or adapter


def test_missing_columns_name_the_columns_and_the_fix(tmp_path, tokenizer):
    data = tmp_path / "sft.jsonl"
    data.write_text(SAMPLE_FILE.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(DataError, match=r"needs the columns chosen and rejected; chosen and rejected are missing "
                                        r"\(the columns are \['input', 'instruction', 'output'\]\).*train\.method=sft"):
        prepare_pairs(load_rows(str(data)), tokenizer, source=str(data), **COMMON)


def test_pair_formats_render_alike(tmp_path, tokenizer):
    """LLaMA-Factory's alpaca form, TRL's explicit prompt (text and messages) and its implicit prompt give the same
    pair; a pair over max_seq_length is dropped."""
    q, good, bad = "하늘은 무슨 색인가요?", "파란색입니다.", "초록색입니다."
    user, asst = {"role": "user", "content": q}, lambda a: {"role": "assistant", "content": a}
    forms = [{"instruction": q, "input": "", "chosen": good, "rejected": bad},
             {"prompt": q, "chosen": good, "rejected": bad},
             {"prompt": [user], "chosen": [asst(good)], "rejected": [asst(bad)]},
             {"chosen": [user, asst(good)], "rejected": [user, asst(bad)]}]
    seen = []
    for i, row in enumerate(forms):
        f = tmp_path / f"f{i}.jsonl"
        f.write_text(json.dumps(row, ensure_ascii=False) + "\n" + json.dumps({**row}, ensure_ascii=False) + "\n")
        p = prepare_pairs(load_rows(str(f)), tokenizer, source=str(f), **COMMON)
        seen.append({k: p.dataset[0][k] for k in ("prompt", "chosen", "rejected")})
    assert all(s == seen[0] for s in seen), seen
    assert seen[0]["chosen"] == good + "<|eot_id|>" and seen[0]["prompt"].endswith("assistant<|end_header_id|>\n\n")
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in
                            [forms[0], {**forms[0], "chosen": "아주 " * 300}]))
    p = prepare_pairs(load_rows(str(long)), tokenizer, source=str(long), **COMMON)
    assert len(p.dataset) == 1 and p.dropped_overlong == [f"{long}, line 2"]


def test_shipped_pairs_are_made_by_their_generator_and_differ():
    from importlib.util import module_from_spec, spec_from_file_location
    spec = spec_from_file_location("make_pairs", PAIRS_FILE.parent / "make_pairs.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    sample = [json.loads(line) for line in SAMPLE_FILE.read_text(encoding="utf-8").splitlines()]
    shipped = [json.loads(line) for line in PAIRS_FILE.read_text(encoding="utf-8").splitlines()]
    assert module.make_pairs(sample) == shipped and len(load_rows(PAIRS)) == len(sample)
    assert all(p["chosen"] == s["output"] and p["rejected"] != p["chosen"] for p, s in zip(shipped, sample))


def test_a_mixture_of_pair_files_in_two_formats_is_shared_by_weight_and_holds_out_each(tmp_path, tokenizer):
    """data.path as a list, as SFT's: LLaMA-Factory's alpaca form beside TRL's conversational prompt form, each
    read by its own columns, weighted, with its held-out pairs split off before mixing (kept for the accuracy at
    the end even when the run does not evaluate); every source's bad pairs in one message."""
    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    write("a.jsonl", [{"instruction": f"질문 A{i}", "input": "", "chosen": f"맞음 A{i}", "rejected": f"틀림 A{i}"}
                      for i in range(20)])
    write("b.jsonl", [{"prompt": [{"role": "user", "content": f"질문 B{i}"}],
                       "chosen": [{"role": "assistant", "content": f"맞음 B{i}"}],
                       "rejected": [{"role": "assistant", "content": f"틀림 B{i}"}]} for i in range(10)])
    mix = [f"data.path=[{{path: {tmp_path}/a.jsonl}}, {{path: {tmp_path}/b.jsonl, weight: 3}}]", "data.eval_ratio=0.1",
           "train.eval_strategy=no"]
    data = load_pairs(load_config("dpo_demo", mix), tokenizer)
    assert [(s.examples, s.used, s.eval_examples) for s in data.mixture] == [(18, 7, 2), (9, 20, 1)]
    questions = [r["question"] for r in data.train.dataset]
    assert sum(q.startswith("질문 A") for q in questions) == 7 and sum(q.startswith("질문 B") for q in questions) == 20
    held = {r["question"] for r in data.eval.dataset}
    assert len(held) == 3 and not held & set(questions)  # no held-out pair is trained on
    for r in data.train.dataset:  # both forms render alike: the question's turn, then each answer and its end
        side = r["question"][3]
        assert r["prompt"].endswith("assistant<|end_header_id|>\n\n") and r["question"] in r["prompt"]
        assert r["chosen"] == f"맞음 {side}{r['question'][4:]}<|eot_id|>"

    for name in ("c.jsonl", "d.jsonl"):
        write(name, [{"prompt": "질문", "chosen": "같음", "rejected": "같음"}] * 3)
    bad = [f"data.path=[{tmp_path}/c.jsonl, {tmp_path}/b.jsonl, {tmp_path}/d.jsonl]", "data.eval_ratio=0",
           "train.eval_strategy=no"]
    with pytest.raises(DataError) as e:
        load_pairs(load_config("dpo_demo", bad), tokenizer)
    assert str(e.value).count("line 1: chosen equals rejected") == 2 and "data.path[2]" in str(e.value)


def test_method_settings_are_validated():
    with pytest.raises(ConfigError) as e:
        load_config("dpo_demo", ["train.method=orpo", "train.loss_type=ipo", "train.beta=0"])
    text = str(e.value)
    assert "override 'train.loss_type=ipo': train.loss_type=ipo: ORPO has no loss variants" in text
    assert "override 'train.beta=0': train.beta=0.0: must be > 0" in text
    with pytest.raises(ConfigError, match=r"'kto' is not one of sft, dpo, orpo"):
        load_config("dpo_demo", ["train.method=kto"])
    with pytest.raises(ConfigError, match=r"train\.loss_type=hinge applies to preference training"):
        load_config("smollm2", ["train.loss_type=hinge"])
    assert load_config("dpo").train.method == "dpo" and load_config("llama31_sft").train.method == "sft"


def test_orpo_trains_two_steps_without_a_reference(tmp_path):
    runs = tmp_path / "runs"
    res = run_dpo(["--config", "dpo_demo", "train.method=orpo", "train.max_steps=2", "data.max_examples=16",
                   "train.per_device_train_batch_size=4", "data.eval_ratio=0", "train.eval_strategy=no",
                   "train.logging_steps=1", f"run.output_dir={runs}"], tmp_path, timeout=900)
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    manifest = json.loads((runs / "dpo_demo" / "manifest.json").read_text())
    assert manifest["method"] == "orpo" and manifest["reference"] == "none (ORPO)"
    assert manifest["result"]["steps"] == 2
    # TRL's ORPO batches have no input_ids: the kit counts their chosen and rejected rows (tokens/s was 0)
    assert manifest["result"]["tokens"] > 0 and manifest["result"]["tokens_per_s"] > 0, manifest["result"]
    rows = [json.loads(line) for line in (runs / "dpo_demo" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in rows)


def test_plan_counts_the_reference_forward_for_dpo_not_orpo(capsys):
    """--plan (no model, no data): DPO's memory estimate carries the reference forward, ORPO's has none; the
    rest (policy weights, LoRA, the chosen and rejected rows' activations) is the same."""
    from kit.recipes import dpo

    def memory(*overrides):
        assert dpo.main(["--plan", "--examples", "1000", *overrides]) == 0
        line = next(line for line in capsys.readouterr().out.splitlines() if "GPU memory" in line)
        return float(line.split("~")[1].split(" GiB")[0]), line

    (d, d_line), (o, o_line) = (memory(f"train.method={m}", "train.gradient_checkpointing=true")
                                for m in ("dpo", "orpo"))
    assert "+ reference forward 2.1" in d_line and "reference" not in o_line, (d_line, o_line)
    assert abs(o - (d - 2.1)) <= 0.1 + 1e-9, (d_line, o_line)  # each figure rounded to 0.1 GiB
    # on an 80 GiB card ORPO's largest micro-batch fits without recompute; DPO's needs checkpointing, for part of
    # the layers
    assert "checkpointing off) + loss" in memory("train.method=orpo", "model.gpu_memory_gib=80")[1]
    assert re.search(r"checkpointing on for \d+ of 32 layers\) \+ loss",
                     memory("train.method=dpo", "model.gpu_memory_gib=80")[1])


def test_a_dpo_run_records_and_launches_its_own_recipe(monkeypatch):
    from kit.train import distributed, report
    direct = report.command_line(["/x/kit/recipes/dpo.py", "--config", "dpo_demo"], module="kit.recipes.dpo")
    assert direct.endswith("-m kit.recipes.dpo --config dpo_demo"), direct
    assert report.command_line(["/usr/bin/kit", "train", "--config", "dpo_demo"], module="kit.recipes.llama31_sft") \
        == "kit train --config dpo_demo"
    started = []
    monkeypatch.setattr(distributed.os, "execv", lambda exe, command: started.append(command))
    distributed.launch(2, ["--config", "dpo_demo"], "kit.recipes.dpo")
    assert started[0][-4:] == ["-m", "kit.recipes.dpo", "--config", "dpo_demo"]
