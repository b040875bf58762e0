"""train.report_to through transformers' integrations, offline and for real: TensorBoard event files, a W&B offline
run folder, an MLflow SQLite store, each in the run directory with the run's config and manifest as parameters and
the sample answers; and the held-out prompts the sample answers ask."""
import json
import struct
from pathlib import Path

import pytest

from kit.core.errors import SetupError
from kit.run.rundir import RunDir
from kit.train import trackers
from tests.helpers import DEMO, question, run_recipe

SHORT = ["data.max_examples=48", "train.num_train_epochs=2", "train.logging_steps=2"]


def test_wandb_runs_offline_in_the_run_directory_unless_the_user_chose_a_mode(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert trackers.environment(["tensorboard", "wandb"], run) == {"WANDB_DIR": str(run.path.resolve()),
                                                                   "WANDB_MODE": "offline"}
    monkeypatch.setenv("WANDB_MODE", "online")
    assert trackers.environment(["wandb"], run)["WANDB_MODE"] == "online"
    assert trackers.environment(["tensorboard", "mlflow"], run) == {}
    assert trackers.integrations(["tensorboard"]) == ["none"]
    assert trackers.integrations(["tensorboard", "mlflow", "wandb"]) == ["mlflow", "wandb"]


def test_a_tracker_that_is_not_installed_is_named_with_its_install_command(monkeypatch):
    import importlib.util
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else find(name))
    with pytest.raises(SetupError) as e:
        trackers.check_installed(["tensorboard", "wandb", "mlflow"])
    assert "names wandb, but wandb is not installed" in str(e.value) and "make setup-extras" in str(e.value)
    trackers.check_installed(["tensorboard", "mlflow"])


def test_parameters_are_flat_dotted_names_in_mlflows_characters_and_length():
    params = trackers.parameters({"kit": {"train": {"learning_rate": 0.001, "report_to": ["wandb"]},
                                          "data": {"fields": {"질문 (ko)": "q"}, "eval_path": None}},
                                  "manifest": {"command": "x" * 50, "plan": {}}}, limit=20)
    assert params == {"kit.train.learning_rate": "0.001", "kit.train.report_to": '["wandb"]',
                      "kit.data.fields.__ _ko_": "q", "kit.data.eval_path": "null",
                      "manifest.command": "x" * 20, "manifest.plan": "{}"}


def test_held_out_prompts_are_the_trained_conversation_up_to_its_last_answer(tokenizer):
    from datasets import Dataset

    from kit.data.heldout import held_out
    from kit.data.load import tokenize
    from kit.models.template import render
    chat = [{"role": "system", "content": "짧게 답하세요."}, {"role": "user", "content": "1 더하기 1은?"},
            {"role": "assistant", "content": "2입니다."}, {"role": "user", "content": "2 더하기 2는?"},
            {"role": "assistant", "content": "4입니다."}]
    long = [{"role": "user", "content": "가나다 " * 200}, {"role": "assistant", "content": "잘림"}]
    text_only = [{"role": "assistant", "content": "혼잣말입니다."}]
    rows = [tokenize(m, tokenizer, 256, responses_only=True) for m in (chat, long, text_only)]
    ds = Dataset.from_list([{"input_ids": r["input_ids"]} for r in rows])
    got = held_out(ds, tokenizer)
    assert len(got) == 2, "the example cut before its answer is left out"
    assert got[0].prompt == render(tokenizer, chat[:-1], add_generation_prompt=True)
    assert (got[0].question, got[0].reference) == ("2 더하기 2는?", "4입니다.")
    assert (got[1].question, got[1].reference) == ("", "혼잣말입니다.")
    assert held_out(ds, tokenizer, limit=1) == got[:1]


def _wandb_records(path):
    """The records of a W&B offline run file (.wandb: LevelDB's log format, 32 KiB blocks, protobuf records)."""
    from wandb.proto import wandb_internal_pb2
    data, pos, records, part = Path(path).read_bytes(), 7, [], b""  # a 7-byte header: b":W&B", magic, version
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or a record's last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """The demo briefly, once with every tracker (wandb in its default mode) and once with none and no samples."""
    cwd = tmp_path_factory.mktemp("trackers")
    runs = cwd / "runs"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("WANDB_MODE", raising=False)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        res = run_recipe(["--config", DEMO, f"run.output_dir={runs}", "run.name=tracked", *SHORT,
                          "train.report_to=[tensorboard, wandb, mlflow]"], cwd=cwd)
    run_recipe(["--config", DEMO, f"run.output_dir={runs}", "run.name=plain", *SHORT, "train.report_to=none",
                "train.sample_prompts=0"], cwd=cwd)
    return runs, res


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_trackers_and_sample_answers_leave_training_as_it_was(tracked):
    runs, _ = tracked
    def losses(name):
        return [(m["step"], m.get("loss"), m.get("eval_loss")) for m in _metrics(runs / name) if "samples" not in m]
    assert losses("tracked") == losses("plain")
    assert not any((runs / "plain" / name).exists() for name in ("tensorboard", "wandb", "mlflow.db"))


@pytest.mark.slow
def test_sample_answers_are_logged_at_each_evaluation(tracked):
    from kit.data.rows import SAMPLE, load_rows
    runs, res = tracked
    metrics = _metrics(runs / "tracked")
    evals = [m["step"] for m in metrics if "eval_loss" in m]
    samples = {m["step"]: m["samples"] for m in metrics if "samples" in m}
    assert sorted(samples) == evals == [6, 12]
    answers = {question(row): row["output"] for row in load_rows(SAMPLE)}
    first = [(s["question"], s["reference"]) for s in samples[6]]
    assert len(first) == 2 and all(answers[q] == reference for q, reference in first), "held-out rows, as trained"
    for step in evals:
        assert [(s["question"], s["reference"]) for s in samples[step]] == first, "the same prompts each time"
        assert all(isinstance(s["answer"], str) for s in samples[step])
    assert res.stderr.count("sample: ") == 4 and "(reference: " in res.stderr


@pytest.mark.slow
def test_wandb_writes_an_offline_run_with_the_config_manifest_and_samples(tracked):
    runs, res = tracked
    run_dir = runs / "tracked"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    folders = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 1 and "wandb sync" in res.stderr + res.stdout
    records = _wandb_records(next(folders[0].glob("run-*.wandb")))
    config = {}
    for r in records:
        updates = r.config.update if r.HasField("config") else r.run.config.update if r.HasField("run") else []
        config.update({u.key: json.loads(u.value_json) for u in updates})
    assert config["kit"]["model"]["name"] == "random:tiny" and config["kit"]["train"]["report_to"][1] == "wandb"
    assert config["manifest"]["dataset"] == manifest["dataset"] and config["learning_rate"] == 3e-3
    history = [{i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
               for r in records if r.HasField("history")]
    assert [json.loads(h["eval/loss"]) for h in history if "eval/loss" in h] == \
           [m["eval_loss"] for m in _metrics(run_dir) if "eval_loss" in m]
    tables = sorted(folders[0].glob("files/media/table/eval/samples_*.table.json"))
    assert len(tables) == 2
    last = json.loads(tables[-1].read_text())
    samples = [m["samples"] for m in _metrics(run_dir) if "samples" in m]
    assert last["columns"] == ["question", "answer", "reference"]
    assert last["data"] in ([list(s.values()) for s in samples[0]], [list(s.values()) for s in samples[1]])


@pytest.mark.slow
def test_mlflow_store_in_the_run_directory_has_the_run_its_parameters_metrics_and_samples(tracked):
    from mlflow import MlflowClient
    runs, _ = tracked
    run_dir = runs / "tracked"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert len(found) == 1
    run = found[0]
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.info.artifact_uri == (run_dir / "mlflow-artifacts" / run.info.run_id / "artifacts").as_uri()
    params = run.data.params
    assert params["kit.model.name"] == "random:tiny" and params["kit.train.sample_prompts"] == "2"
    assert params["manifest.dataset.fingerprint"] == manifest["dataset"]["fingerprint"]
    assert params["learning_rate"] == "0.003", "MLflowCallback's own TrainingArguments parameters"
    evals = [m["eval_loss"] for m in _metrics(run_dir) if "eval_loss" in m]
    assert [h.value for h in client.get_metric_history(run.info.run_id, "eval_loss")] == pytest.approx(evals)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "manifest.json", "eval"} <= artifacts
    samples = [m["samples"] for m in _metrics(run_dir) if "samples" in m]
    for step, rows in zip((6, 12), samples):
        path = client.download_artifacts(run.info.run_id, f"eval/samples/step-{step:07d}.json")
        assert json.loads(Path(path).read_text(encoding="utf-8")) == rows


@pytest.mark.slow
def test_tensorboard_has_the_samples_and_the_record_as_text(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    runs, _ = tracked
    events = EventAccumulator(str(runs / "tracked" / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    tags = events.Tags()["tensors"]
    assert {"eval/samples/text_summary", "kit/config/text_summary", "kit/manifest/text_summary"} <= set(tags)
    samples = events.Tensors("eval/samples/text_summary")
    assert [e.step for e in samples] == [6, 12]
    table = samples[-1].tensor_proto.string_val[0].decode()
    last = [m["samples"] for m in _metrics(runs / "tracked") if "samples" in m][-1]
    assert table.splitlines()[0] == "question | answer | reference" and last[0]["reference"] in table
