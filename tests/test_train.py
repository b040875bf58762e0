"""End-to-end training through the real recipe on CPU: Unsloth's CPU fallback and the HF backend."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import DEMO, run_recipe, run_recipe_killed_after, train_rows

pytestmark = pytest.mark.slow


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_demo_run_directory_is_complete(demo_run):
    run_dir, res = demo_run
    for name in ["config.yaml", "manifest.json", "metrics.jsonl", "loss.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/tokenizer.json", "adapter/tokenizer_config.json"]:
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["backend"] == "unsloth" and manifest["device"].startswith("cpu")
    assert len(manifest["dataset"]["fingerprint"]) == 16 and manifest["seed"] == 42
    assert {"torch", "transformers", "trl", "peft", "unsloth"} <= set(manifest["packages"])
    assert "git_commit" in manifest and "cpu-train.txt" in manifest["requirements"]
    # checkpoints are the plan's, and complete
    ckpts = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    planned = manifest["plan"]["checkpoints"][-2:]  # save_total_limit: 2
    assert [c.name for c in ckpts] == planned and all((c / "kit-complete").exists() for c in ckpts)
    tok_cfg = json.loads((run_dir / "adapter/tokenizer_config.json").read_text())
    template = tok_cfg.get("chat_template") or (run_dir / "adapter/chat_template.jinja").read_text()
    assert "<|start_header_id|>" in template
    assert "kit: training finished" in res.stdout and "best eval loss" in res.stdout
    # the summary and the manifest name what computed attention and the loss (Unsloth's CPU path, TRL's loss head)
    result = manifest["result"]
    assert (result["attention"], result["loss_kernel"]) == ("PyTorch SDPA (Unsloth's CPU path)",
                                                            "TRL's chunked fused LM head (no full logits)")
    assert re.search(rf"^ +attention +{re.escape(result['attention'])}$", res.stdout, re.MULTILINE), res.stdout
    assert re.search(rf"^ +loss +{re.escape(result['loss_kernel'])}$", res.stdout, re.MULTILINE), res.stdout


def test_demo_loss_falls(demo_run):
    metrics = _metrics(demo_run[0])
    train = [m["loss"] for m in metrics if "loss" in m]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert train[-1] < 0.25 * train[0], train
    assert evals[-1] < evals[0], evals


def test_lora_weights_changed_and_base_frozen(demo_run, tmp_path):
    from safetensors.torch import load_file
    run_dir = demo_run[0]
    weights = load_file(run_dir / "adapter/adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights), "the adapter holds only LoRA matrices"
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    layers = json.loads((run_dir / "base-model/config.json").read_text())["num_hidden_layers"]
    assert len(lora_b) == layers * 7 and all(v.abs().max() > 0 for v in lora_b), "LoRA B starts at zero: it trained"
    # the base stayed frozen: the optimizer trained exactly the LoRA matrices (an unfrozen base weight would be
    # one more parameter, with its own Adam state, in the last checkpoint's optimizer.pt)
    import torch
    last = max((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    optim = torch.load(last / "optimizer.pt", map_location="cpu", weights_only=True)
    trained = [i for group in optim["param_groups"] for i in group["params"]]
    assert len(trained) == len(weights), (len(trained), len(weights))
    assert set(optim["state"]) == set(trained), "every trained parameter took steps"
    assert sum(st["exp_avg"].numel() for st in optim["state"].values()) == sum(v.numel() for v in weights.values())
    # and the base it applies to is the one it started from: a fresh build from the same seed, bit for bit
    from kit.models.tiny import build_random_model
    fresh = build_random_model("tiny", 0, tmp_path / "fresh")
    a, b = load_file(run_dir / "base-model/model.safetensors"), load_file(fresh / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_demo_answers_training_questions_with_trained_answers(demo_run):
    from kit.data.load import to_messages
    from kit.eval.infer import generate, load_adapter_model
    from tests.helpers import decided_greedy_text
    run_dir = demo_run[0]
    model, tok = load_adapter_model(run_dir)
    rows = train_rows(run_dir)
    hits = []
    for row in rows.select(range(5)):
        msgs = to_messages(row, "alpaca", {}, None, "sample")[:1]
        answer = generate(model, tok, msgs, max_new_tokens=48)
        # greedy answers are compared up to the first near-tie (tests/helpers.py): past it either token may win
        decided = decided_greedy_text(model, tok, msgs, 48, tolerance=0.01)
        assert answer.startswith(decided)
        hits.append(answer == row["output"] or (len(decided) > 0 and row["output"].startswith(decided)))
    assert hits[0], "the first training question must get its trained answer, greedily"
    assert sum(hits) >= 4, hits


def test_demo_logs_sample_answers_the_model_gives_at_each_evaluation(demo_run):
    from kit.eval.infer import load_adapter_model
    from tests.helpers import decided_greedy_text
    run_dir = demo_run[0]
    metrics = _metrics(run_dir)
    evals = [m["step"] for m in metrics if "eval_loss" in m]
    samples = {m["step"]: m["samples"] for m in metrics if "samples" in m}
    assert sorted(samples) == evals and all(len(s) == 2 for s in samples.values())
    first, last = samples[evals[0]], samples[evals[-1]]
    assert [s["answer"] for s in first] != [s["answer"] for s in last], "the answers change as the model trains"
    model, tokenizer = load_adapter_model(run_dir)
    decided = [decided_greedy_text(model, tokenizer, [{"role": "user", "content": s["question"]}], 32, 0.01)
               for s in last]
    for s, expected in zip(last, decided):  # the last evaluation saw the final weights (equal up to a near-tie)
        assert s["answer"].startswith(expected)
    assert any(decided), "tokens decided clearly enough to compare"


def test_existing_run_directory_is_refused_and_left_intact(demo_run):
    run_dir, _ = demo_run
    before = (run_dir / "adapter/adapter_model.safetensors").read_bytes()
    res = run_recipe(["--config", DEMO, f"run.output_dir={run_dir.parent}"], cwd=run_dir.parent, check=False)
    assert res.returncode == 2 and "already exists" in res.stderr and "resume_from_checkpoint=auto" in res.stderr
    assert (run_dir / "adapter/adapter_model.safetensors").read_bytes() == before


SHORT = ["model.max_seq_length=128", "data.max_examples=48", "train.per_device_train_batch_size=4",
         "train.max_steps=12", "train.logging_steps=1", "train.save_strategy=steps", "train.save_steps=4",
         "train.eval_strategy=no", "train.save_total_limit=null", "train.lr_scheduler_type=linear"]


def test_hf_backend_trains_same_model_from_same_start(tmp_path):
    runs = tmp_path / "runs"
    run_recipe(["--config", DEMO, f"run.output_dir={runs}", "run.name=hf", "model.backend=hf", *SHORT,
                "export.formats=[merged16]"], cwd=tmp_path)
    assert (runs / "hf/export/merged16/config.json").is_file(), "the recipe's export section ran"
    run_recipe(["--config", DEMO, f"run.output_dir={runs}", "run.name=us", "model.backend=unsloth",
                "train.max_steps=1", *[s for s in SHORT if "max_steps" not in s]], cwd=tmp_path)
    hf, us = _metrics(runs / "hf"), _metrics(runs / "us")
    hf_loss = [m["loss"] for m in hf if "loss" in m]
    us_loss = [m["loss"] for m in us if "loss" in m]
    assert hf_loss[-1] < hf_loss[0]
    assert abs(hf_loss[0] - us_loss[0]) < 0.05 * hf_loss[0], (hf_loss[0], us_loss[0])
    assert json.loads((runs / "hf/manifest.json").read_text())["backend"] == "hf"
    assert (runs / "hf/adapter/adapter_model.safetensors").is_file()


def test_resume_after_sigkill_continues_to_same_step_and_loss(tmp_path):
    runs = tmp_path / "runs"
    common = ["--config", DEMO, f"run.output_dir={runs}", *SHORT]
    run_recipe([*common, "run.name=ref"], cwd=tmp_path)
    run_recipe_killed_after(8, [*common, "run.name=killed"], cwd=tmp_path)
    assert (runs / "killed/checkpoints/checkpoint-8/kit-complete").exists()
    assert not (runs / "killed/checkpoints/checkpoint-12").exists() and not (runs / "killed/adapter").exists()
    res = run_recipe([*common, "run.name=killed", "train.resume_from_checkpoint=auto"], cwd=tmp_path)
    assert "resuming from" in res.stderr
    ref = {m["step"]: m["loss"] for m in _metrics(runs / "ref") if "loss" in m}
    got = {m["step"]: m["loss"] for m in _metrics(runs / "killed") if "loss" in m}
    assert sorted(got) == sorted(ref) and max(got) == 12  # each step logged once, to the planned end
    for step in range(9, 13):
        assert abs(got[step] - ref[step]) < 1e-3 * max(1.0, ref[step]), (step, got[step], ref[step])
    state = json.loads((runs / "killed/checkpoints/checkpoint-12/trainer_state.json").read_text())
    assert state["global_step"] == 12


def _two_at_once(args, cwd, run_dir):
    """Start two recipes on one run directory at once. The one that claims it first is frozen (SIGSTOP) until
    the other has ended, so the outcome does not hang on which is faster, and the run's files are compared
    across the other's whole life. Returns both exit statuses, the loser's stderr and the winner's pid."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    errs = [cwd / f"stderr-{i}" for i in range(2)]
    procs = []
    for err in errs:
        with open(err, "w") as f:
            procs.append(subprocess.Popen([sys.executable, "-m", "kit.recipes.llama31_sft", *args], cwd=cwd,
                                          env=env, stdout=subprocess.DEVNULL, stderr=f))
    lock, deadline = run_dir / ".kit-lock", time.time() + 600
    try:
        while (winner := next((p for p in procs if lock.is_file() and lock.read_text().strip() == str(p.pid)),
                              None)) is None:
            assert time.time() < deadline and all(p.poll() is None for p in procs), "neither claimed the run"
            time.sleep(0.05)
        winner.send_signal(signal.SIGSTOP)
        loser = procs[1 - procs.index(winner)]
        files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        loser.wait(timeout=600)
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files, "the loser changed nothing"
        winner.send_signal(signal.SIGCONT)
        winner.wait(timeout=600)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return winner.returncode, loser.returncode, errs[procs.index(loser)].read_text(), winner.pid


def test_one_process_at_a_time_trains_in_a_run_directory(tmp_path):
    """Two new runs of one name at once, then two resumes of it at once: one trains, the other stops at once
    (exit 2, naming the run and the process) and metrics.jsonl holds each step once."""
    runs = tmp_path / "runs"
    short = [s for s in SHORT if "max_steps" not in s and "max_examples" not in s]
    common = ["--config", DEMO, f"run.output_dir={runs}", "data.max_examples=16", *short]
    for args in (["train.max_steps=4"], ["train.max_steps=8", "train.resume_from_checkpoint=auto"]):
        won, lost, err, pid = _two_at_once([*common, *args], tmp_path, runs / "demo")
        assert won == 0 and lost == 2, err
        assert f"error: run directory {runs / 'demo'} is in use: process {pid} is training in it" in err, err
        assert "Traceback" not in err
    steps = [m["step"] for m in _metrics(runs / "demo") if "loss" in m]
    assert steps == list(range(1, 9)), steps


def test_resume_without_checkpoint_is_an_error(tmp_path):
    res = run_recipe(["--config", DEMO, f"run.output_dir={tmp_path}", "train.resume_from_checkpoint=auto"],
                     cwd=tmp_path, check=False)
    assert res.returncode == 2 and "no complete checkpoint" in res.stderr


def test_paged_optimizer_on_cpu_is_refused_before_loading(tmp_path):
    res = run_recipe(["--config", DEMO, f"run.output_dir={tmp_path}", "train.optim=paged_adamw_8bit"],
                     cwd=tmp_path, check=False)
    assert res.returncode == 2 and "needs bitsandbytes on a CUDA GPU" in res.stderr
    assert not any(tmp_path.iterdir()), "nothing is written before validation passes"


def test_overfitting_alarm_and_early_stopping_keep_the_best_checkpoint(tmp_path):
    """64 examples, a fixed held-out set and many epochs: the model memorises, eval loss turns up."""
    from safetensors.torch import load_file
    res = run_recipe(["--config", DEMO, f"run.output_dir={tmp_path}", "run.name=es", "data.max_examples=64",
                      "train.num_train_epochs=30", "train.early_stopping_patience=2", "train.overfit_patience=1",
                      "train.save_total_limit=1"], cwd=tmp_path)
    run_dir = tmp_path / "es"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    evals = [(m["step"], m["eval_loss"]) for m in _metrics(run_dir) if "eval_loss" in m]
    best_step = min(evals, key=lambda e: e[1])[0]
    assert manifest["result"]["stopped_early"] and evals[-1][0] < manifest["plan"]["total_steps"]
    assert manifest["result"]["best_eval_step"] == best_step
    alarms = manifest["overfit_alarms"]
    assert alarms and alarms[0]["best_step"] <= best_step and "overfitting" in res.stderr
    # the final adapter is the best checkpoint's, which the checkpoint limit kept
    best = run_dir / "checkpoints" / f"checkpoint-{best_step}" / "adapter_model.safetensors"
    a, b = load_file(best), load_file(run_dir / "adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
