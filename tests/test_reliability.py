"""Hostile input, round two (issue 29): likely-mistaken values, a missing gguf package and what a tracker needs,
each refused before any model loads with one message that says what, where and the fix (exit 2, no traceback),
or accepted with a warning that names the real number. Nothing here loads a model or trains."""
import importlib.util
import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from kit import cli
from kit.config.load import load_config
from kit.core.errors import ConfigError, SetupError
from kit.data.load import load_data
from kit.models.gguf_source import PINS, materialize
from kit.train import trackers
from tests.helpers import ROOT

ROWS = [{"instruction": f"질문 {i}", "output": f"답 {i}"} for i in range(20)]


def _jsonl(path: Path, rows=ROWS) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- likely-mistaken values

@pytest.mark.parametrize("override, expected", [
    ("train.sample_max_new_tokens=1000000", "train.sample_max_new_tokens=1000000 is longer than "
                                            "model.max_seq_length=256.*Use at most 256"),
    ("run.name=a\nb", r"override 'run.name=a\\nb': the value holds a line break.*on one line"),
    ("run.name=run\x1b[31m", r"control character \('\\x1b'\)"),
], ids=["sample-tokens", "newline-name", "escape-name"])
def test_likely_mistaken_values_are_refused_with_their_override(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config("demo", [override])


def test_the_same_source_twice_in_a_mixture_is_refused_and_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _jsonl(tmp_path / "a.jsonl")
    with pytest.raises(ConfigError) as e:
        load_config("demo", ["data.path=[a.jsonl, ./a.jsonl, kit:ko_sample, {path: kit:ko_sample, weight: 2}]"])
    assert "data.path[1] is data.path[0] again (./a.jsonl)" in str(e.value)
    assert "data.path[3] is data.path[2] again (kit:ko_sample)" in str(e.value) and "set its weight" in str(e.value)
    load_config("demo", ["data.path=[a.jsonl, {path: a.jsonl, fields: {instruction: output, output: instruction}}]"])


def _data(*overrides):
    return load_config(None, ["model.max_seq_length=128", *overrides])


def test_more_sample_prompts_than_eval_examples_says_how_many_are_answered(tmp_path, tokenizer, caplog):
    f = _jsonl(tmp_path / "d.jsonl")
    data = load_data(_data(f"data.path={f}", "data.eval_ratio=0.2", "train.sample_prompts=1000000"),
                     tokenizer)
    held = len(data.eval.dataset)
    assert f"train.sample_prompts=1000000, but the eval split holds {held} example(s)" in caplog.text
    caplog.clear()
    load_data(_data(f"data.path={f}", "data.eval_ratio=0.2", f"train.sample_prompts={held}"), tokenizer)
    assert "sample_prompts" not in caplog.text


def test_a_mixture_source_whose_share_rounds_to_nothing_is_named(tmp_path, tokenizer, caplog):
    a, b = _jsonl(tmp_path / "a.jsonl"), _jsonl(tmp_path / "b.jsonl", ROWS[:10])
    data = load_data(_data(f"data.path=[{a}, {{path: {b}, weight: 0.001}}]", "data.eval_ratio=0",
                           "train.eval_strategy=no"),
                     tokenizer)
    assert [s.used for s in data.mixture] == [30, 0]
    assert f"data.path[1] {b}: its share of the mixture's 30 training examples rounds to 0" in caplog.text
    assert "data.path[0]" not in caplog.text


def _kit(args, capsys) -> tuple[int, str]:
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_eval_with_no_task_named_is_refused(tmp_path, capsys):
    code, err = _kit(["eval", str(tmp_path), "--tasks", " , ,"], capsys)
    assert code == 2 and "argument --tasks: ' , ,' names no task" in err and "kit_heldout,hellaswag" in err


@pytest.mark.parametrize("url", ["notaurl", "ftp://host/v1", "http://"])
def test_adapters_load_of_something_not_a_url(tmp_path, capsys, url):
    code, err = _kit(["adapters", "load", url, str(tmp_path)], capsys)
    assert code == 2 and f"error: '{url}' is not a server's URL" in err and "http://127.0.0.1:8000/v1" in err


# ---------------------------------------------------------------- the gguf package

def test_a_gguf_model_without_the_gguf_package_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find(name, *a))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(SetupError, match=rf"model.name: {model} is read with the gguf package, which is not installed "
                                         r"here: pip install gguf==0\.19\.0 \(or run `make setup-train`\)"):
        materialize(str(model))
    assert not (tmp_path / "hf-home").exists(), "nothing written"
    assert PINS["gguf"] in (ROOT / "requirements" / "cpu-train.txt").read_text().splitlines()


# ---------------------------------------------------------------- trackers, before any model loads

@pytest.fixture
def tracker_env(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "MLFLOW_TRACKING_URI",
                 "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return monkeypatch


def _check(tmp_path, *overrides):
    trackers.check(load_config("demo", ["train.report_to=[tensorboard, wandb, mlflow]",
                                        f"run.output_dir={tmp_path / 'runs'}", *overrides]))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_trackers_by_default_need_nothing_but_their_packages(tmp_path, tracker_env):
    _check(tmp_path)
    tracker_env.setenv("WANDB_MODE", "disabled")
    tracker_env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    _check(tmp_path)


@pytest.mark.parametrize("variables, expected", [
    ({"WANDB_MODE": "sometimes"}, "WANDB_MODE=sometimes: not a mode of wandb; use offline"),
    ({"WANDB_MODE": "online"}, "WANDB_MODE=online uploads to https://api.wandb.ai, but no API key is set: set "
                               "WANDB_API_KEY, or run `wandb login`"),
    ({"MLFLOW_TRACKING_URI": "mlfow://host:5000"}, "MLFLOW_TRACKING_URI=mlfow://host:5000: MLflow has no store for "
                                                   "'mlfow:'. Use http(s)://HOST:PORT"),
    ({"MLFLOW_TRACKING_URI": "file:///tmp/mlruns"}, "is MLflow's file store, which MLflow 3 refuses"),
    ({"MLFLOW_TRACKING_URI": "./mlruns"}, "is MLflow's file store"),
    ({"MLFLOW_TRACKING_URI": "sqlite:////no/such/folder/mlflow.db"}, "/no/such/folder: no such folder. Give a SQLite "
                                                                     "file in a folder you can write"),
], ids=["wandb-mode", "wandb-no-key", "mlflow-scheme", "mlflow-file-uri", "mlflow-path", "mlflow-sqlite-folder"])
def test_what_a_tracker_needs_is_checked_first(tmp_path, tracker_env, variables, expected):
    for name, value in variables.items():
        tracker_env.setenv(name, value)
    with pytest.raises(ConfigError) as e:
        _check(tmp_path)
    assert expected in str(e.value)
    assert not (tmp_path / "runs").exists(), "nothing written"


def test_a_tracking_server_that_does_not_answer_is_named_after_a_bounded_wait(tmp_path, tracker_env):
    port = _closed_port()
    tracker_env.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match=rf"MLFLOW_TRACKING_URI=http://127.0.0.1:{port}: the tracking server does "
                                          r"not answer \(Connection refused\)\. Start it"):
        _check(tmp_path)
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        tracker_env.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{silent.getsockname()[1]}")
        with pytest.raises(ConfigError, match=r"the tracking server does not answer \(timed out\)"):
            _check(tmp_path)


def test_a_wandb_key_in_netrc_is_found_and_then_the_server_asked(tmp_path, tracker_env):
    port = _closed_port()
    (tmp_path / "netrc").write_text(f"machine 127.0.0.1:{port}\n  login user\n  password {'k' * 40}\n")
    tracker_env.setenv("WANDB_MODE", "online")
    tracker_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match=rf"WANDB_MODE=online: the W&B server http://127.0.0.1:{port} does not "
                                          r"answer \(Connection refused\)"):
        _check(tmp_path)


def test_tracker_records_of_an_existing_run_that_cannot_be_written(tmp_path, tracker_env):
    run = tmp_path / "runs" / "demo"
    (run / "mlflow.db").mkdir(parents=True)
    (run / "wandb").write_text("")
    with pytest.raises(ConfigError) as e:
        _check(tmp_path)
    text = str(e.value)
    assert f"{run / 'wandb'} is a file, not a folder; train.report_to's wandb records there. Move it aside" in text
    assert f"{run / 'mlflow.db'} is a folder, not a file; train.report_to's mlflow records there" in text
    _check(tmp_path, "run.overwrite=true")  # the old run is moved aside, its records with it


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes past a folder's permission bits")
def test_a_read_only_tracker_folder_is_named(tmp_path, tracker_env):
    board = tmp_path / "runs" / "demo" / "tensorboard"
    board.mkdir(parents=True)
    board.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match=rf"{board} cannot be written \(Permission denied\)"):
            _check(tmp_path)
    finally:
        board.chmod(0o755)


# ---------------------------------------------------------------- Ctrl-C

def test_ctrl_c_in_a_command_is_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    from kit.export import exporter

    def stopped(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(exporter, "run_cli", stopped)
    code, err = _kit(["export", str(tmp_path), "--to", "merged16"], capsys)
    assert code == 130 and err == "kit export: stopped (Ctrl-C); run it again to finish.\n"


def _training_run(tmp_path, status="training", checkpoints=()):
    from kit.run.rundir import COMPLETE, RunDir, checkpoint_name
    run = RunDir(tmp_path / "runs" / "demo")
    run.checkpoints.mkdir(parents=True)
    run.manifest.write_text(json.dumps({"status": status, "plan": {"total_steps": 40}}))
    run.metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 10, 20)))
    for step, complete in checkpoints:
        (run.checkpoints / checkpoint_name(step)).mkdir()
        if complete:
            (run.checkpoints / checkpoint_name(step) / COMPLETE).write_text("")
    return run


COMMAND = ["kit", "train", "--config", "demo", "run.output_dir=my runs", "train.resume_from_checkpoint=auto"]


def test_ctrl_c_while_training_marks_the_run_and_names_the_checkpoint_and_the_resume(tmp_path, capsys):
    from kit.run.rundir import interrupted, read_manifest
    run = _training_run(tmp_path, checkpoints=[(10, True), (20, False)])
    assert interrupted(run, COMMAND) == 130
    err = capsys.readouterr().err
    assert err == (f"interrupted (Ctrl-C) in {run.path} after step 20; last complete checkpoint: "
                   f"{run.checkpoints / 'checkpoint-10'}; go on from it with: kit train --config demo "
                   "'run.output_dir=my runs' train.resume_from_checkpoint=auto\n")
    assert read_manifest(run) == {"status": "interrupted", "plan": {"total_steps": 40}}
    assert (run.checkpoints / "checkpoint-20").is_dir(), "the unfinished checkpoint is left for the resume to set aside"


def test_ctrl_c_before_a_checkpoint_or_before_training(tmp_path, capsys):
    from kit.run.rundir import RunDir, interrupted, read_manifest
    run = _training_run(tmp_path)
    interrupted(run, COMMAND[:-1])
    assert "no complete checkpoint yet; start again with: kit train --config demo 'run.output_dir=my runs' " \
           "run.overwrite=true\n" in capsys.readouterr().err
    assert read_manifest(run)["status"] == "interrupted"
    fresh = RunDir(tmp_path / "runs" / "new")
    assert interrupted(fresh, COMMAND[:-1]) == 130
    assert capsys.readouterr().err.endswith("after step 0; training had not started; start it with: kit train "
                                            "--config demo 'run.output_dir=my runs'\n")
    assert not fresh.path.exists(), "nothing written"


@pytest.mark.parametrize("stop, code, expected", [
    (KeyboardInterrupt(), 130, "interrupted (Ctrl-C) in {run} after step 20; last complete checkpoint: "),
    (OSError(28, "No space left on device"), 2, "error: training in {run} stopped after step 20: the disk is full. "
     "Free space or fix the folder's permissions; last complete checkpoint: "),
    (RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on "
                  "device\" }) (os error 28)"), 2, "error: training in {run} stopped after step 20: the disk is full."),
], ids=["ctrl-c", "ENOSPC", "safetensors-full"])
def test_the_recipe_marks_a_run_stopped_while_training(tmp_path, monkeypatch, capsys, stop, code, expected):
    """The recipe's command (kit.recipes.llama31_sft) with its training replaced by one that stops mid-run."""
    from kit.recipes import llama31_sft, steps
    from kit.run.rundir import RunDir, read_manifest

    def stopped(cfg, *args, **kwargs):
        _training_run(tmp_path, checkpoints=[(10, True)])
        raise stop
    monkeypatch.setattr(steps, "run", stopped)
    argv = ["--config", "demo", f"run.output_dir={tmp_path / 'runs'}"]
    assert llama31_sft.main(argv) == code
    run = tmp_path / "runs" / "demo"
    err = capsys.readouterr().err
    assert err.startswith(expected.format(run=run)) and "Traceback" not in err, err
    assert err.rstrip().endswith(f"{' '.join(argv[:2])} run.output_dir={tmp_path / 'runs'} "
                                 "train.resume_from_checkpoint=auto"), err
    assert read_manifest(RunDir(run))["status"] == ("interrupted" if code == 130 else "failed")


def test_an_error_that_is_not_the_disks_stays_the_librarys_and_the_run_is_left_as_it_was(tmp_path, monkeypatch):
    from kit.recipes import llama31_sft, steps
    from kit.run.rundir import RunDir, read_manifest

    def broken(cfg, *args, **kwargs):
        _training_run(tmp_path)
        raise ValueError("a library's own bug")
    monkeypatch.setattr(steps, "run", broken)
    with pytest.raises(ValueError, match="a library's own bug"):
        llama31_sft.main(["--config", "demo", f"run.output_dir={tmp_path / 'runs'}"])
    assert read_manifest(RunDir(tmp_path / "runs" / "demo"))["status"] == "training"


# ---------------------------------------------------------------- two processes on one run directory

def test_a_run_directory_another_process_trains_in_is_refused_until_that_process_ends(tmp_path):
    import subprocess
    import sys

    from kit.run import rundir
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("mine")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys\n"
        f"f = open({str(run / rundir.LOCK)!r}, 'a+')\n"
        "fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write(f'{os.getpid()}\\n'); f.flush()\n"
        "print('held', flush=True); sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        for resume in ([], ["train.resume_from_checkpoint=auto"], ["run.overwrite=true"]):
            with pytest.raises(ConfigError, match=rf"run directory {run} is in use: process {holder.pid} is training "
                                                  rf"in it.*\(or stop it \(kill {holder.pid}\)\) and run again"):
                rundir.start(load_config("demo", [f"run.output_dir={run.parent}", *resume]))
        assert sorted(p.name for p in run.iterdir()) == [rundir.LOCK, "notes.txt"], "nothing moved or written"
    finally:
        holder.kill()  # as a crash would end it: the kernel drops its lock
        holder.wait()
    with pytest.raises(ConfigError, match="already exists"):  # the directory is free: the usual checks follow
        rundir.start(load_config("demo", [f"run.output_dir={run.parent}"]))


# ---------------------------------------------------------------- disk and permissions

@pytest.mark.skipif(os.geteuid() == 0, reason="root writes past a folder's permission bits")
@pytest.mark.parametrize("folder, resume", [
    ("checkpoints", []),  # an attempt that stopped before training
    ("checkpoints", ["train.resume_from_checkpoint=auto"]),
    ("checkpoints/checkpoint-4", ["train.resume_from_checkpoint=auto"]),
], ids=["new", "resume", "resume-checkpoint"])
def test_a_read_only_checkpoint_folder_is_found_before_training(tmp_path, folder, resume):
    from kit.run import rundir
    run = tmp_path / "runs" / "demo"
    (run / "checkpoints").mkdir(parents=True)
    if resume:
        checkpoint = run / "checkpoints" / "checkpoint-4"
        shutil.copytree(ROOT / "tests" / "assets" / "adapter", checkpoint)
        (checkpoint / "trainer_state.json").write_text('{"global_step": 4}')
        (checkpoint / rundir.COMPLETE).write_text("4")
    (run / folder).chmod(0o555)
    try:
        with pytest.raises(ConfigError, match=rf"{run / folder}: cannot be written, and training saves and rotates "
                                              r"its checkpoints there\. Make it writable \(chmod -R u\+w"):
            rundir.start(load_config("demo", [f"run.output_dir={run.parent}", "lora.r=4", "lora.alpha=8", *resume]))
    finally:
        (run / folder).chmod(0o755)
