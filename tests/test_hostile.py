"""Hostile input (issue 10): data files, configuration, run directories, no network, resume, export and serve
preflight. Each case ends in one error that says what is wrong, where (file and line as an editor counts them,
or the key) and what to do; or in an accepted input that says so; and never in a changed record of an earlier
run. Fast cases use tiny files and the KB adapter of tests/assets; the resume cases (slow) train the demo recipe
for a few steps."""
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kit.config.load import load_config
from kit.config.schema import check_models
from kit.core import io
from kit.core.errors import AdapterError, ConfigError, DataError, PreflightError
from kit.data.load import load_data, prepare, tokenize
from kit.data.rows import WHERE, load_rows
from kit.models import hub
from kit.run import rundir
from kit.serve import preflight
from tests.helpers import ASSETS, DEMO, edit_adapter_config, run_recipe, run_recipe_killed_after

EOT, START_HEADER = 128009, 128006


# ---------------------------------------------------------------- data

def _write(path: Path, content) -> Path:
    """A data file: text, bytes, or rows (JSON Lines)."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, list):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in content), encoding="utf-8")
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _prepare(path, tokenizer, **kw):
    args = dict(fmt="auto", fields={}, system_prompt=None, max_len=128, responses_only=True, overlong="truncate",
                source=str(path))
    return prepare(load_rows(str(path)), tokenizer, **{**args, **kw})


def _data_cfg(path, *more):
    return load_config(None, [f"data.path={path}", "train.eval_strategy=no", "data.eval_ratio=0",
                              "model.max_seq_length=128", *more])


def _user_text(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("row, shown", [
    ({"instruction": 12345, "output": "다섯 자리"}, "12345"),
    ({"instruction": "원주율은?", "output": 3.14}, "3.14"),
    ({"instruction": "참인가요?", "output": True}, "true"),
])
def test_number_where_text_is_expected_is_used_as_text_and_said(tmp_path, tokenizer, caplog, row, shown):
    f = _write(tmp_path / "d.jsonl", [row] * 2)
    data = load_data(_data_cfg(f), tokenizer)
    assert len(data.train.dataset) == 2 and shown in _user_text(tokenizer, data.train.dataset[0]["input_ids"])
    assert "used as text" in caplog.text and f"{f}, line 1, field" in caplog.text


def test_column_mixing_text_and_numbers_keeps_the_numbers_as_text(tmp_path, tokenizer, caplog):
    f = _write(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": 7, "output": "c"}])
    assert len(_prepare(f, tokenizer).dataset) == 2
    assert "column 'instruction' holds text and numbers" in caplog.text and f"{f}, line 2" in caplog.text


@pytest.mark.parametrize("content, expected", [
    ('{"instruction": "안녕하세요", "output": "네"}\n'.encode("cp949"), r"line 1: not UTF-8 text; the file looks like "
     r"CP949 \(EUC-KR\).*iconv -f CP949 -t UTF-8 .*d\.jsonl > .*d\.utf8\.jsonl"),
    ('{"instruction": "a", "output": "b"}\n'.encode("utf-16"), "line 1: not UTF-8 text; the file looks like UTF-16"),
    (b'{"instruction": "a", "output": "b"}\n' * 2 + b'{"instruction": "\xff\xff", "output": "b"}\n',
     "line 3: not UTF-8 text. Save the file as UTF-8"),
], ids=["cp949", "utf-16", "neither"])
def test_file_that_is_not_utf8_names_its_line_and_the_conversion(tmp_path, content, expected):
    with pytest.raises(DataError, match=expected):
        load_rows(str(_write(tmp_path / "d.jsonl", content)))


def test_utf8_byte_order_mark_is_accepted(tmp_path, tokenizer):
    f = _write(tmp_path / "d.jsonl", b"\xef\xbb\xbf" + '{"instruction": "가", "output": "나"}\n'.encode())
    assert len(_prepare(f, tokenizer).dataset) == 1


@pytest.mark.parametrize("name, text, expected", [
    ("d.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "instruction": "b", "output": "c"}\n',
     r"d\.jsonl, line 2: key 'instruction' appears twice"),
    ("d.json", '[\n  {"instruction": "a", "output": "b"},\n  {"output": "b",\n   "output": "c"}\n]\n',
     r"d\.json, line 3: key 'output' appears twice"),
    ("d.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "a" "output": "b"}\n',
     r"d\.jsonl, line 3: not valid JSON \(Expecting ',' delimiter, column \d+\)"),
    ("d.jsonl", '{"instruction": "a", "output": "b"} {"instruction": "c", "output": "d"}\n',
     r"d\.jsonl, line 1: more than one JSON value on this line"),
    ("d.jsonl", '["instruction", "output"]\n', r"d\.jsonl, line 1: a row must be a JSON object \{...\}, got a list"),
    ("d.json", '[\n {"instruction": "a", "output": "b"},\n "loose text"\n]', r"d\.json, line 3: a row must be a JSON"),
    ("d.json", '[\n {"instruction": "a", "output": "b"}\n {"instruction": "c"}\n]', r"d\.json, line 3: not valid JSON"),
    ("d.json", '[{"instruction": "a", "output": "b"}]\n\n[]', r"d\.json, line 3: more after the list of rows"),
    ("d.json", '{"train": [{"instruction": "a", "output": "b"}], "test": [{"instruction": "a", "output": "b"}]}',
     r"several lists of rows \(train, test\)"),
    ("d.csv", 'instruction,output\n"a, b",c\nd,e,f\n', r"d\.csv, line 3: 3 fields, but the header has 2"),
    ("d.csv", 'instruction,output,output\na,b,c\n', r"d\.csv, line 1: column 'output' appears twice in the header"),
])
def test_malformed_file_names_file_line_and_fix(tmp_path, name, text, expected):
    with pytest.raises(DataError, match=expected):
        load_rows(str(_write(tmp_path / name, text)))


def test_csv_lines_are_counted_across_quoted_line_breaks(tmp_path, tokenizer):
    f = _write(tmp_path / "d.csv", 'instruction,output\n"two\nlines",a\nq,\n')
    with pytest.raises(DataError, match=r"d\.csv, line 4: field 'output' is missing or empty"):
        _prepare(f, tokenizer)


def test_top_level_object_wrapping_the_rows_is_read_and_said(tmp_path, tokenizer, caplog):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(4)]
    f = _write(tmp_path / "d.json", json.dumps({"version": 2, "data": rows}))
    ds = load_rows(str(f))
    assert len(ds) == 4 and ds[3][WHERE] == f"{f}, 'data' row 4"
    assert "its rows are read from the list under 'data'" in caplog.text


def test_json_lines_in_a_json_file_are_accepted(tmp_path):
    f = _write(tmp_path / "d.json", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    assert len(load_rows(str(f))) == 2


def test_folder_of_json_and_jsonl_with_different_columns_names_both_files(tmp_path):
    (tmp_path / "mixed").mkdir()
    _write(tmp_path / "mixed" / "a.json", json.dumps([{"instruction": "a", "output": "b"}]))
    _write(tmp_path / "mixed" / "b.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"different columns: .*a\.json has \['instruction', 'output'\], "
                                        r".*b\.jsonl has \['answer', 'question'\]"):
        load_rows(str(tmp_path / "mixed"))


def test_folder_with_an_empty_parquet_beside_a_good_one_names_the_file(tmp_path):
    import pandas as pd
    (tmp_path / "pq").mkdir()
    pd.DataFrame({"instruction": ["a"], "output": ["b"]}).to_parquet(tmp_path / "pq" / "good.parquet")
    (tmp_path / "pq" / "empty.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"pq/empty\.parquet: not a readable Parquet file .*0 bytes.*move it out"):
        load_rows(str(tmp_path / "pq"))


@pytest.mark.parametrize("second, expected", [
    ({"question": ["a"], "answer": ["b"]}, "different columns"),
    ({"instruction": [1], "output": [2]}, "different types"),
])
def test_folder_of_parquet_files_that_disagree(tmp_path, second, expected):
    import pandas as pd
    (tmp_path / "pq").mkdir()
    pd.DataFrame({"instruction": ["a"], "output": ["b"]}).to_parquet(tmp_path / "pq" / "1.parquet")
    pd.DataFrame(second).to_parquet(tmp_path / "pq" / "2.parquet")
    with pytest.raises(DataError, match=expected):
        load_rows(str(tmp_path / "pq"))


def test_parquet_rows_are_named_by_file_and_row(tmp_path, tokenizer):
    import pandas as pd
    pd.DataFrame({"instruction": ["a", "b"], "output": ["c", ""]}).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet, row 2: field 'output' is missing"):
        _prepare(tmp_path / "d.parquet", tokenizer)


def test_errors_name_the_file_line_not_the_position_after_the_eval_split(tmp_path, tokenizer):
    rows = [{"instruction": f"질문 {i}", "output": f"답 {i}"} for i in range(20)]
    rows[6]["output"] = ""
    f = _write(tmp_path / "d.jsonl", rows)
    cfg = load_config(None, [f"data.path={f}", "data.eval_ratio=0.25", "model.max_seq_length=128"])
    with pytest.raises(DataError, match=rf"{f}, line 7: field 'output' is missing or empty"):
        load_data(cfg, tokenizer)


def test_dropped_examples_are_named_by_line(tmp_path, tokenizer):
    rows = [{"instruction": "짧은 질문", "output": "짧은 답"}, {"instruction": "긴 질문 " * 100, "output": "답"}]
    f = _write(tmp_path / "d.jsonl", rows)
    assert _prepare(f, tokenizer, max_len=64).dropped_masked == [f"{f}, line 2"]


def test_control_token_text_in_data_is_trained_as_plain_text_and_said(tmp_path, tokenizer, caplog):
    injected = "안녕<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
    f = _write(tmp_path / "d.jsonl", [{"instruction": injected, "output": "반가워요"},
                                      {"instruction": "평범한 질문", "output": "평범한 답"}])
    data = load_data(_data_cfg(f), tokenizer)
    first, plain = data.train.dataset[0]["input_ids"], data.train.dataset[1]["input_ids"]
    # the template's own control tokens are real; the ones typed into the data are plain text
    assert first.count(EOT) == plain.count(EOT) == 3 and first.count(START_HEADER) == plain.count(START_HEADER) == 3
    assert injected in _user_text(tokenizer, first)
    assert data.train.control_text == [f"{f}, line 1"] and "trained as plain text" in caplog.text


def test_plain_rows_tokenize_as_the_whole_rendered_text(tokenizer):
    from kit.models.template import render
    msgs = [{"role": "system", "content": "짧게"}, {"role": "user", "content": "<|eot_id|>는 무엇?"},
            {"role": "assistant", "content": "토큰입니다."}]
    literal = tokenize(msgs, tokenizer, 512, responses_only=True)
    plain = tokenize([msgs[0], {"role": "user", "content": "무엇?"}, msgs[2]], tokenizer, 512, responses_only=True)
    assert literal["literal"] and not plain["literal"]
    assert plain["input_ids"] == tokenizer(render(tokenizer, [msgs[0], {"role": "user", "content": "무엇?"}, msgs[2]]),
                                           add_special_tokens=False)["input_ids"]
    # the answer and its <|eot_id|> are trained either way
    assert [t for t, label in zip(literal["input_ids"], literal["labels"]) if label != -100] == \
        [t for t, label in zip(plain["input_ids"], plain["labels"]) if label != -100]


@pytest.mark.parametrize("rows, expected", [
    ([{"instruction": ["a", "b"], "output": "c"}], r"line 1, field 'instruction' is a list; it should be text"),
    ([{"instruction": {"ko": "a"}, "output": "c"}], r"line 1, field 'instruction' is an object; it should be text"),
    ([{"messages": "hello"}], r"line 1: 'messages' must be a non-empty list"),
    ([{"messages": [{"role": "user", "content": "a"}]}], r"line 1: the conversation has no assistant turn"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, {"messages": "x"}],
     r"line 2: column 'messages' holds values of different kinds"),
])
def test_wrong_kinds_of_values_name_the_line(tmp_path, tokenizer, rows, expected):
    with pytest.raises(DataError, match=expected):
        _prepare(_write(tmp_path / "d.jsonl", rows), tokenizer)


def test_sharegpt_and_openai_turns_in_one_file(tmp_path, tokenizer):
    f = _write(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]}])
    assert len(_prepare(f, tokenizer).dataset) == 2


# ---------------------------------------------------------------- configuration

@pytest.mark.parametrize("override, expected", [
    ("train.num_train_epochs=.inf", "train.num_train_epochs: inf is not a finite number"),
    ("train.max_grad_norm=.inf", "train.max_grad_norm: inf is not a finite number"),
    ("train.learning_rate=.nan", "train.learning_rate: nan is not a finite number"),
    ("train.max_steps=1000000000000000", "the kit plans at most 1,000,000 steps"),
    ("train.seed=1099511627776", "train.seed=1099511627776: use 0..4294967295"),
    ("model.random_seed=-1", "model.random_seed=-1: use 0.."),
    ("data.fields={instruction: q", "override 'data.fields={instruction: q': the value is not valid YAML"),
    ("train.seed", "must look like section.key=value"),
    ("run.name=" + "가" * 100, "run.name is 300 bytes long; file systems allow 255"),
    ('run.name="a\\nb"', "run.name='a\\nb': use a plain folder name"),
    ("run.output_dir=", "run.output_dir='': give a folder"),
])
def test_impossible_values_are_refused_with_their_key(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert expected in str(e.value)


def test_exponent_numbers_read_alike_in_a_file_and_on_the_command_line(tmp_path):
    f = _write(tmp_path / "r.yaml", "train:\n  learning_rate: 2e-4\n  max_steps: 1e3\n")
    from_file = load_config(f)
    assert from_file.train.learning_rate == load_config(None, ["train.learning_rate=2e-4"]).train.learning_rate == 2e-4
    assert from_file.train.max_steps == 1000
    assert load_config(None, ["data.path=1e5"]).data.path == "1e5"  # text stays text


@pytest.mark.parametrize("text", ["- model\n- train\n", "hello\n"])
def test_recipe_that_is_not_a_mapping_with_an_override(tmp_path, text):
    with pytest.raises(ConfigError, match="a recipe is a mapping of sections"):
        load_config(_write(tmp_path / "r.yaml", text), ["train.seed=1"])


@pytest.mark.parametrize("text, expected", [
    ("train:\n  learning_rate: 1e-4\n  seed: 1\n  learning_rate: 3e-4\n",
     "r.yaml, line 4: 'train.learning_rate' is set twice, on lines 2 and 4"),
    ("train:\n  seed: 1\nlora:\n  r: 8\ntrain:\n  seed: 2\n", "r.yaml, line 5: 'train' is set twice, on lines 1 and 5"),
    ("train:\n  seed: [1, 2\n", "r.yaml, line 3: not valid YAML (expected ',' or ']'"),
    ("train:\n\tseed: 1\n", "r.yaml, line 2: not valid YAML"),
])
def test_recipe_file_problems_name_the_line(tmp_path, text, expected):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path / "r.yaml", text))
    assert expected in str(e.value)


def test_recipe_not_in_utf8(tmp_path):
    with pytest.raises(ConfigError, match="not UTF-8 text .* save the recipe as UTF-8"):
        load_config(_write(tmp_path / "r.yaml", "run:\n  name: 한글\n".encode("cp949")))


def _recipe(args, tmp_path, env=None, timeout=120):
    """The recipe's command line in a subprocess; returns CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "kit.recipes.llama31_sft", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, expected", [
    (["--plan", "--examples", "-5"], "argument --examples: '-5' is not a whole number of 1 or more"),
    (["--plan", "--examples", "many"], "argument --examples: 'many' is not a whole number of 1 or more"),
    (["--plan", "--examples", "100", "train.max_steps=1000000000000000"], "the kit plans at most 1,000,000 steps"),
    (["--plan", "--examples", "1000000000", "train.num_train_epochs=1000"],
     "1000 epochs of 31,250,000 steps make 31,250,000,000 optimizer steps"),
])
def test_plan_refuses_impossible_counts_at_once(tmp_path, args, expected):
    res = _recipe(args, tmp_path, timeout=60)  # a bound, not a measure: a plan of 10^12 steps would not end
    assert res.returncode == 2 and expected in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_traceback_only_when_asked_for_with_kit_debug(tmp_path):
    args = ["--plan", "--examples", "10", "train.num_train_epochs=.inf"]
    plain, debug = _recipe(args, tmp_path), _recipe(args, tmp_path, {"KIT_DEBUG": "1"})
    assert plain.returncode == debug.returncode == 2
    assert plain.stderr.strip().splitlines() == [
        "error: override 'train.num_train_epochs=.inf': train.num_train_epochs: inf is not a finite number; give a "
        "number such as 1.0."]
    assert "Traceback" in debug.stderr and "kit.core.errors.ConfigError" in debug.stderr


# ---------------------------------------------------------------- run directories

def _start(tmp_path, *overrides):
    return rundir.start(load_config("demo", [f"run.output_dir={tmp_path / 'runs'}", *overrides]))


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"runs is a file, not a folder\. Choose a run\.output_dir"):
        _start(tmp_path)


def test_output_dir_below_a_file(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(ConfigError, match="runs is a file, not a folder"):
        _start(tmp_path, f"run.output_dir={tmp_path / 'runs' / 'more'}")


def test_output_dir_that_cannot_be_written(tmp_path):
    target = tmp_path / "read-only"
    target.mkdir()
    target.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere a permission bit forbids; not where the kernel does
        target = Path("/sys/kit-runs")
    try:
        with pytest.raises(ConfigError, match=r"cannot write in .*(Permission denied|Operation not permitted)"):
            rundir.start(load_config("demo", [f"run.output_dir={target}"]))
    finally:
        (tmp_path / "read-only").chmod(0o755)


def test_output_dir_path_too_long_for_the_file_system(tmp_path):
    deep = tmp_path.joinpath(*["d" * 200] * 25)  # 5,000 characters: past PATH_MAX
    with pytest.raises(ConfigError, match="too long for this file system"):
        _start(tmp_path, f"run.output_dir={deep}")


def test_run_left_before_training_started_is_used_again_and_a_users_folder_is_not(tmp_path):
    run = tmp_path / "runs" / "demo"
    (run / "base-model").mkdir(parents=True)
    (run / "tensorboard").mkdir()
    (run / "wandb").mkdir()  # the trackers' records of an attempt that stopped as training began
    (run / "mlflow.db").write_bytes(b"")
    assert _start(tmp_path) is None and (run / "base-model").is_dir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        _start(tmp_path)
    assert (run / "notes.txt").read_text() == "mine"


def test_overwrite_moves_the_old_run_aside_whole(tmp_path):
    run = tmp_path / "runs" / "demo"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"trained")
    (run / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match="already exists"):
        _start(tmp_path)
    assert _start(tmp_path, "run.overwrite=true") is None
    aside = [p for p in run.parent.iterdir() if p != run]
    assert len(aside) == 1 and aside[0].name.startswith("demo.replaced-"), aside
    assert (aside[0] / "adapter" / "adapter_model.safetensors").read_bytes() == b"trained"
    assert (aside[0] / "manifest.json").read_text() == "{}"
    assert [p.name for p in run.iterdir()] == [rundir.LOCK], "the new run starts in an empty directory"


@pytest.mark.parametrize("resume, expected", [
    ("auto", "holds no complete checkpoint"),
    ("/no/such/checkpoint", "not a checkpoint folder"),
])
def test_resume_without_a_checkpoint(tmp_path, resume, expected):
    with pytest.raises(ConfigError, match=expected):
        _start(tmp_path, f"train.resume_from_checkpoint={resume}")


def _checkpoints(folder: Path, steps: dict) -> None:
    for step, complete in steps.items():
        d = folder / rundir.checkpoint_name(step)
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        if complete:
            (d / rundir.COMPLETE).write_text(str(step))


def test_rotation_keeps_the_older_checkpoint_until_a_newer_one_is_complete(tmp_path):
    _checkpoints(tmp_path, {4: True, 8: True, 12: False})
    rundir.rotate_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-12", "checkpoint-8"]
    (tmp_path / "checkpoint-12" / rundir.COMPLETE).write_text("12")
    rundir.rotate_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-12"]


def test_rotation_keeps_the_best_checkpoint_and_clears_half_deleted_ones(tmp_path):
    _checkpoints(tmp_path, {4: True, 8: True, 12: True, 16: True})
    (tmp_path / ".deleted-checkpoint-2").mkdir()  # a kill while deleting
    rundir.rotate_checkpoints(tmp_path, keep=2, best=str(tmp_path / "checkpoint-4"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-12", "checkpoint-16", "checkpoint-4"]
    rundir.rotate_checkpoints(tmp_path, keep=None)
    assert len(list(tmp_path.iterdir())) == 3


def test_checkpoint_callback_marks_then_rotates_and_record_waits_for_training(tmp_path):
    from types import SimpleNamespace

    from kit.train.callbacks import MarkComplete, RunRecord
    _checkpoints(tmp_path, {4: True, 8: False})
    state = SimpleNamespace(global_step=8, is_world_process_zero=True, best_model_checkpoint=None)
    MarkComplete(keep=1).on_save(SimpleNamespace(output_dir=str(tmp_path), world_size=1), state, None)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-8"]
    assert (tmp_path / "checkpoint-8" / rundir.COMPLETE).exists()
    written = []
    RunRecord(lambda: written.append(True)).on_train_begin(None, state, None)
    assert written == [True]


def test_run_record_is_written_at_begin_with_metrics_cut_to_the_checkpoint(tmp_path):
    run = rundir.RunDir(tmp_path)
    run.metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 11)))
    rundir.begin(run, "run:\n  name: x\n", {"status": "training"}, tmp_path / "checkpoint-8")
    assert [m["step"] for m in rundir.read_metrics(run.metrics)] == list(range(1, 9))
    assert json.loads(run.manifest.read_text()) == {"status": "training"} and run.config.read_text().startswith("run:")


RECORD = ("config.yaml", "manifest.json", "metrics.jsonl")


def _digest(run: Path) -> dict:
    return {name: hashlib.sha256((run / name).read_bytes()).hexdigest() for name in RECORD}


@pytest.fixture
def checkpointed_run(tmp_path):
    """A run directory with its record and one complete checkpoint: the KB adapter of tests/assets (r=4,
    alpha 8, the 7 projections), a trainer state and an optimizer state as torch saves them."""
    import torch
    run = tmp_path / "runs" / "demo"
    ckpt = run / "checkpoints" / "checkpoint-8"
    shutil.copytree(ASSETS / "adapter", ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 8}))
    torch.save({"state": {}, "param_groups": []}, ckpt / "optimizer.pt")
    (ckpt / rundir.COMPLETE).write_text("8")
    for name in RECORD:
        (run / name).write_text(f"{name} of the earlier run\n")
    return run


def _resume(run: Path, *overrides):
    return rundir.start(load_config("demo", [f"run.output_dir={run.parent}", "lora.r=4", "lora.alpha=8",
                                             "train.resume_from_checkpoint=auto", *overrides]))


def test_a_sound_checkpoint_is_resumed(checkpointed_run):
    assert _resume(checkpointed_run) == checkpointed_run / "checkpoints" / "checkpoint-8"


@pytest.mark.parametrize("damage, overrides, expected", [
    ({"adapter_model.safetensors": b"\x00" * 64}, [], "adapter_model.safetensors cannot be read"),
    ({"adapter_config.json": b"[]"}, [], "adapter_config.json: it holds list, not an object"),
    ({"optimizer.pt": b"PK\x03\x04 cut short"}, [], "optimizer.pt: damaged"),
    ({"trainer_state.json": b'{"global_step": '}, [], "trainer_state.json: cannot be read"),
    ({}, ["lora.r=8"], "other LoRA settings: lora.r=8 but the checkpoint has 4"),
    ({}, ["lora.alpha=16", "lora.target_modules=qkv"],
     "lora.alpha=16 but the checkpoint has 8; lora.target_modules=['k_proj', 'q_proj', 'v_proj'] but the checkpoint"),
], ids=["weights", "adapter-config", "optimizer", "trainer-state", "lora-r", "lora-alpha-targets"])
def test_checkpoint_that_cannot_be_resumed_is_refused_before_anything_changes(checkpointed_run, damage, overrides,
                                                                               expected):
    for name, content in damage.items():
        (checkpointed_run / "checkpoints" / "checkpoint-8" / name).write_bytes(content)
    before = _digest(checkpointed_run)
    with pytest.raises((ConfigError, AdapterError)) as e:
        _resume(checkpointed_run, *overrides)
    assert expected in str(e.value) and _digest(checkpointed_run) == before
    if damage:
        assert "Resume from an earlier checkpoint" in str(e.value)


# ---------------------------------------------------------------- no network

OFFLINE = {"HF_HUB_OFFLINE": "1"}


@pytest.fixture
def empty_hub_cache(tmp_path):
    """A Hugging Face home with nothing cached, so that no case depends on this machine's cache."""
    return {"HF_HOME": str(tmp_path / "hf-home")}


@pytest.mark.parametrize("network, reason", [
    (OFFLINE, "HF_HUB_OFFLINE=1 is set"),
    ({"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"},
     "no connection to 127.0.0.1:9"),
])
def test_default_model_without_a_hub_is_a_kit_error_in_seconds(tmp_path, empty_hub_cache, network, reason):
    # a bound, not a measure: the Hub client alone would retry for a minute, and the start takes some seconds
    res = _recipe(["--plan"], tmp_path, {**empty_hub_cache, **network}, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "model.name='meta-llama/Llama-3.1-8B-Instruct': not in the local Hugging Face cache" in res.stderr
    assert reason in res.stderr and "HF_TOKEN" in res.stderr and "local model folder" in res.stderr


def test_offline_tokenizer_and_missing_model_folder_name_their_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(None, ["model.name=random:tiny", "model.tokenizer=someone/not-cached-tokenizer-kit-test"])
    with pytest.raises(ConfigError, match="model.tokenizer='someone/not-cached-tokenizer-kit-test': not in the local"):
        check_models(cfg)
    with pytest.raises(ConfigError, match="model.name='./models/llama': no such model folder"):
        check_models(load_config(None, ["model.name=./models/llama"]))
    with pytest.raises(ConfigError, match="neither a local model folder nor a Hugging Face Hub id"):
        hub.check_model("random:tiny", "model.name")


def test_export_and_serve_of_an_adapter_on_an_unreachable_hub_base(adapter_run, monkeypatch):
    from kit.export import exporter
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    edit_adapter_config(adapter_run, base_model_name_or_path="someone/not-cached-base-kit-test")
    for command in (lambda: exporter.export(adapter_run, "merged16"), lambda: preflight.check([adapter_run])):
        with _bound(60), pytest.raises(ConfigError, match="base_model_name_or_path='someone/not-cached-base-kit-test': "
                                                          "not in the local Hugging Face cache.*HF_HUB_OFFLINE=1"):
            command()
    assert not (adapter_run / "export").exists()


class _Expired(BaseException):
    """Past a test's bound: a BaseException, so that no `except Exception` in the code under test takes it."""


@contextlib.contextmanager
def _bound(seconds: int):
    """Stop what runs in this block after `seconds` (a hang fails; a slow machine does not: no time is asserted)."""
    def expired(*_):
        raise _Expired(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- export and serve preflight

@pytest.mark.parametrize("content, expected", [
    ("[1, 2]", "it holds list, not an object"),
    ('{"r": 4, "peft_type": "LORA"}', "base_model_name_or_path is missing"),
    ('{"r": 4, "base_model_name_or_path": "x", "peft_type": "IA3"}', "peft_type is 'IA3'"),
    ('{"r": "four", "base_model_name_or_path": "x"}', "r is 'four', not a rank"),
    ('{"r": 4, "base_model_name_or', "not valid JSON"),
])
def test_damaged_adapter_config_is_refused_by_export_and_serve(adapter_run, content, expected):
    from kit.export import exporter
    (adapter_run / "adapter" / "adapter_config.json").write_text(content)
    for command in (lambda: exporter.export(adapter_run, "merged16"), lambda: preflight.check([adapter_run])):
        with pytest.raises(AdapterError, match=expected):
            command()
    assert not (adapter_run / "export").exists()


@pytest.mark.parametrize("keep", [0, 300])
def test_truncated_adapter_weights_are_refused_by_serve(adapter_run, keep):
    weights = adapter_run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep])
    with pytest.raises(AdapterError, match="the file is corrupt"):
        preflight.check([adapter_run])


@pytest.mark.parametrize("runs, kw, error, expected", [
    (["missing"], {}, AdapterError, "no adapter"),
    (["run"], {"merged": True}, PreflightError, "no merged export"),
    (["run", "run"], {}, PreflightError, "two runs have the same name"),
    (["run"], {"max_model_len": 10**7}, PreflightError, "max_position_embeddings"),
])
def test_serve_preflight_refusals(adapter_run, runs, kw, error, expected):
    with pytest.raises(error, match=expected):
        preflight.check([adapter_run.parent / r for r in runs], **kw)


def _kit(args, capsys) -> tuple[int, str]:
    from kit.cli import main
    code = main(args)
    return code, capsys.readouterr().err


def test_quant_with_merged16_is_refused(adapter_run, capsys):
    code, err = _kit(["export", str(adapter_run), "--to", "merged16", "--quant", "q3_k_s"], capsys)
    assert code == 2 and "--quant q3_k_s: merged16 is not quantized; --quant goes with --to gguf" in err
    code, err = _kit(["export", str(adapter_run), "--to", "gguf", "--quant", "q3_k_s"], capsys)
    assert code == 2 and "unknown GGUF type" in err
    assert not (adapter_run / "export").exists()


def test_verify_of_a_missing_run(tmp_path, capsys):
    code, err = _kit(["verify", str(tmp_path / "missing")], capsys)
    assert code == 2 and "no adapter" in err and "Traceback" not in err


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_partial_folders_of_an_interrupted_export_are_cleaned_at_the_next(adapter_run, caplog):
    from kit.export import exporter
    pid = _dead_pid()
    left = [adapter_run / "export" / f".{name}.partial-{pid}" for name in ("merged16", "gguf-q8_0")]
    for folder in left:
        (folder / "half").mkdir(parents=True)
    live = adapter_run / "export" / f".merged16.partial-{os.getppid()}"  # a running process's work in progress
    live.mkdir()
    out = exporter.export(adapter_run, "merged16")
    assert (out / "config.json").is_file() and not any(p.exists() for p in left) and live.is_dir()
    assert f"left by an interrupted write (process {pid})" in caplog.text


def test_kill_between_the_two_renames_puts_the_previous_export_back(tmp_path):
    target = tmp_path / "merged16"
    old = tmp_path / f".merged16.old-{_dead_pid()}"
    old.mkdir()
    (old / "config.json").write_text("{}")
    with io.atomic_dir(target, replace=True) as tmp:
        assert (target / "config.json").read_text() == "{}"  # put back before the new copy is written
        (tmp / "config.json").write_text('{"new": 1}')
    assert json.loads((target / "config.json").read_text()) == {"new": 1} and not old.exists()


# ---------------------------------------------------------------- resume (trains: slow)

STEPS = ["model.max_seq_length=128", "data.max_examples=32", "train.per_device_train_batch_size=4",
         "train.max_steps=16", "train.logging_steps=1", "train.save_strategy=steps", "train.save_steps=4",
         "train.eval_strategy=no"]  # the demo recipe's own save_total_limit: 2


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """The demo recipe killed (SIGKILL) after a checkpoint, then resumed to its end with checkpoint rotation."""
    cwd = tmp_path_factory.mktemp("resume")
    common = ["--config", DEMO, f"run.output_dir={cwd / 'runs'}", "run.name=r", *STEPS]
    run = cwd / "runs" / "r"
    run_recipe_killed_after(8, common, cwd=cwd)
    assert (run / "checkpoints" / "checkpoint-8" / "kit-complete").exists() and not (run / "adapter").exists()
    killed_manifest = json.loads((run / "manifest.json").read_text())
    res = run_recipe([*common, "train.resume_from_checkpoint=auto"], cwd=cwd)
    return run, common, killed_manifest, res


@pytest.mark.slow
def test_resume_after_sigkill_with_rotation_finishes_and_records_the_end(killed_and_resumed):
    run, _, killed_manifest, res = killed_and_resumed
    assert killed_manifest["status"] == "training" and "resuming from" in res.stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert "status" not in manifest and manifest["result"]["steps"] == 16 and "kit: training finished" in res.stdout
    losses = [m["step"] for m in rundir.read_metrics(run / "metrics.jsonl") if "loss" in m]
    assert losses == list(range(1, 17)), "each step logged once, to the planned end"
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-16"]
    assert not list((run / "checkpoints").glob(".deleted-*"))


@pytest.mark.slow
def test_resuming_a_finished_run_says_so_and_changes_nothing(killed_and_resumed):
    run, common, _, _ = killed_and_resumed
    before = _digest(run)
    res = run_recipe([*common, "train.resume_from_checkpoint=auto"], cwd=run.parent.parent, check=False)
    assert res.returncode == 2 and "the run is finished: checkpoint-16 is step 16 of the 16" in res.stderr
    assert "Traceback" not in res.stderr and _digest(run) == before


@pytest.mark.slow
def test_resume_with_other_lora_settings_exits_2_and_leaves_the_record(killed_and_resumed, tmp_path):
    run, common, _, _ = killed_and_resumed
    copy = tmp_path / "runs" / "r"
    shutil.copytree(run, copy)
    before = _digest(copy)
    args = [a for a in common if not a.startswith("run.output_dir=")]
    res = run_recipe([*args, f"run.output_dir={tmp_path / 'runs'}", "train.max_steps=20",
                      "train.resume_from_checkpoint=auto", "lora.r=8"], cwd=tmp_path, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "was trained with other LoRA settings: lora.r=8 but the checkpoint has 16" in res.stderr
    assert _digest(copy) == before

