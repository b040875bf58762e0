"""Training on several processes (DDP) for real, on CPU: torchrun starts two ranks that talk through gloo.
Two ranks of batch 4 train what one process of batch 8 trains (the same examples each step, the gradients
averaged); rank 0 alone writes one complete run directory; a checkpoint resumes on as many ranks, and only on
as many; the plan counts the steps as the Trainer does with two ranks."""
import json
import os
import subprocess
import sys

import pytest

from kit.config.load import load_config
from kit.core.errors import ConfigError
from kit.train.plan import make_plan
from tests.helpers import DEMO, run_recipe

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
SHORT = ["--config", DEMO, "model.max_seq_length=128", "data.max_examples=48", "train.max_steps=4",
         "train.logging_steps=1", "train.save_strategy=steps", "train.save_steps=2", "train.eval_strategy=steps",
         "train.eval_steps=2", "train.save_total_limit=null"]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _logged(run_dir, key):
    return {m["step"]: m[key] for m in _metrics(run_dir) if key in m}


# ---------------------------------------------------------------- the plan, without training

def test_guide_example_on_two_gpus_and_how_to_keep_one_gpus_batch():
    cfg = load_config(None, ["train.save_strategy=epoch"])  # batch 8, accumulation 4, 3 epochs
    plan = make_plan(cfg, examples=2400, devices=2)
    assert (plan.effective_batch, plan.steps_per_epoch, plan.total_steps) == (64, 38, 114)
    assert plan.checkpoints == ["checkpoint-38", "checkpoint-76", "checkpoint-114"]
    assert plan.as_one_device == "train.gradient_accumulation_steps=2"
    same = make_plan(load_config(None, ["train.gradient_accumulation_steps=2"]), examples=2400, devices=2)
    assert same.steps_per_epoch == make_plan(cfg, examples=2400).steps_per_epoch == 75
    assert make_plan(load_config(None, ["train.gradient_accumulation_steps=1"]), 2400, devices=2).as_one_device \
        == "train.per_device_train_batch_size=4"
    assert make_plan(load_config(None, ["train.gradient_accumulation_steps=1"]), 2400, devices=3).as_one_device == ""


def test_plan_devices_on_a_machine_without_gpus(tmp_path):
    # options between overrides, as a user appends them
    res = subprocess.run([sys.executable, "-m", "kit.recipes.llama31_sft", "--plan", "train.save_strategy=epoch",
                          "--devices", "2", "train.logging_steps=5", "--examples", "2400"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = {" ".join(line.split()) for line in res.stdout.splitlines()}
    assert {"effective batch 64 (batch x accumulation x 2 device(s))", "steps per epoch 38", "total steps 114",
            "as on 1 device effective batch 32 with train.gradient_accumulation_steps=2",
            "checkpoints checkpoint-38, checkpoint-76, checkpoint-114"} <= lines, res.stdout


def test_what_cannot_run_distributed_is_refused(tmp_path, monkeypatch, capsys):
    from kit.config.schema import check_processes
    from kit.recipes.llama31_sft import main
    from kit.run.rundir import check_devices
    with pytest.raises(ConfigError, match="3 training processes on this machine but 2 GPU"):
        check_processes(3, gpus=2)
    check_processes(2, gpus=0)  # CPU processes share the CPU (gloo)
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    for rank in (0, 1):
        (checkpoint / f"rng_state_{rank}.pth").write_bytes(b"")
    check_devices(checkpoint, 2)
    with pytest.raises(ConfigError, match=r"written by 2 training process\(es\) and this run has 1.*--devices 2"):
        check_devices(checkpoint, 1)
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun sets it for each of 4 processes
    assert main(["--plan", "--examples", "100", "--devices", "2"]) == 2
    assert "this process is one of 4 that the launcher started" in capsys.readouterr().err


# ---------------------------------------------------------------- two ranks training, for real

@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The same 4 steps by one process of batch 8 and, through `--devices 2`, by two of batch 4."""
    cwd = tmp_path_factory.mktemp("ddp")
    runs = cwd / "runs"
    run_recipe([*SHORT, f"run.output_dir={runs}", "run.name=one", "train.per_device_train_batch_size=8"], cwd=cwd)
    res = run_recipe(["--devices", "2", *SHORT, f"run.output_dir={runs}", "run.name=two",
                      "train.per_device_train_batch_size=4"], cwd=cwd)
    return runs, res


@pytest.mark.slow
def test_two_ranks_train_what_one_process_trains(two_ranks):
    runs, _ = two_ranks
    # the eval set is split over the ranks in other batches, whose mean losses the Trainer averages: close, not equal
    for key, tolerance in (("loss", 1e-4), ("grad_norm", 1e-4), ("eval_loss", 1e-2)):
        one, two = _logged(runs / "one", key), _logged(runs / "two", key)
        assert sorted(two) == sorted(one) and one, key
        assert all(abs(two[s] - one[s]) <= tolerance * abs(one[s]) for s in one), (key, one, two)


@pytest.mark.slow
def test_rank_zero_writes_one_complete_run_directory(two_ranks):
    import torch
    from safetensors.torch import load_file

    from kit.eval.infer import load_adapter_model
    from kit.eval.verify import prompt_ids
    runs, res = two_ranks
    run_dir = runs / "two"
    assert res.stdout.count("kit: training finished") == 1 and res.stdout.count("plan for") == 1
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["plan"]["devices"] == 2 and manifest["plan"]["effective_batch"] == 8
    assert manifest["result"]["devices"] == 2 and manifest["result"]["steps"] == 4
    assert "--nproc_per_node=2" in manifest["command"]
    checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [c.name for c in checkpoints] == manifest["plan"]["checkpoints"] == ["checkpoint-2", "checkpoint-4"]
    for c in checkpoints:  # complete, with the RNG state of each rank
        assert (c / "kit-complete").exists() and {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in c.iterdir()}
    assert [m["step"] for m in _metrics(run_dir) if "loss" in m] == [1, 2, 3, 4], "each step logged once"
    assert len(list((run_dir / "tensorboard").iterdir())) == 1
    # the adapter is the last step's, and computes what one process trained (the same examples and steps)
    adapter, last = (load_file(d / "adapter_model.safetensors") for d in (run_dir / "adapter", checkpoints[-1]))
    assert adapter.keys() == last.keys() and all(torch.equal(adapter[k], last[k]) for k in adapter)
    logits = {}
    for name in ("one", "two"):
        model, tokenizer = load_adapter_model(runs / name)
        ids = torch.tensor([prompt_ids(tokenizer, "안녕하세요")])
        with torch.no_grad():
            logits[name] = model(ids).logits
            with model.disable_adapter():
                logits["base"] = model(ids).logits
    assert (logits["two"] - logits["one"]).abs().max() < 1e-3  # measured 5e-6, against an adapter's effect of 12
    assert (logits["one"] - logits["base"]).abs().max() > 1.0, "the adapter trained"


@pytest.mark.slow
def test_checkpoint_of_two_ranks_resumes_on_two_only(two_ranks, tmp_path):
    runs, _ = two_ranks
    run_dir = runs / "two"
    common = [*SHORT, f"run.output_dir={runs}", "run.name=two", "train.per_device_train_batch_size=4",
              f"train.resume_from_checkpoint={run_dir / 'checkpoints/checkpoint-2'}"]
    alone = run_recipe(common, cwd=tmp_path, check=False)
    assert alone.returncode == 2 and "was written by 2 training process(es) and this run has 1" in alone.stderr
    before = _logged(run_dir, "loss")
    res = subprocess.run([*TORCHRUN, "-m", "kit.recipes.llama31_sft", *common], cwd=tmp_path, capture_output=True,
                         text=True, timeout=1200, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert res.returncode == 0, res.stderr[-5000:]
    after = _logged(run_dir, "loss")
    assert sorted(after) == [1, 2, 3, 4]
    assert all(abs(after[s] - before[s]) <= 1e-4 * before[s] for s in (3, 4)), (before, after)


@pytest.mark.slow
def test_hf_backend_trains_on_two_ranks_under_torchrun(tmp_path):
    from kit.run.rundir import read_adapter
    res = subprocess.run([*TORCHRUN, "-m", "kit.recipes.llama31_sft", *SHORT, f"run.output_dir={tmp_path}",
                          "model.backend=hf", "train.per_device_train_batch_size=4", "train.max_steps=2",
                          "train.eval_strategy=no"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-5000:]
    manifest = json.loads((tmp_path / "demo/manifest.json").read_text())
    assert manifest["backend"] == "hf" and manifest["result"]["steps"] == 2 and manifest["plan"]["devices"] == 2
    assert read_adapter(tmp_path / "demo").rank == 16


# ---------------------------------------------------------------- the Trainer's count on two ranks

TRAINER = r"""
import json, sys
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        return {"loss": (self.w - input_ids.float().mean()) ** 2}

def collate(rows):
    n = max(len(r["input_ids"]) for r in rows)
    return {"input_ids": torch.tensor([r["input_ids"] + [0] * (n - len(r["input_ids"])) for r in rows])}

rows = Dataset.from_list([{"input_ids": list(range(1 + i % 50))} for i in range(2400)])
counted = {}
for sampling, batch, accum in [("random", 8, 4), ("batch_rebalance", 8, 4), ("batch_rebalance", 32, 1)]:
    out = f"{sys.argv[1]}/{sampling}-{batch}x{accum}"
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                             num_train_epochs=3, save_strategy="epoch", save_only_model=True,
                             train_sampling_strategy=sampling, use_cpu=True, report_to="none", disable_tqdm=True,
                             logging_strategy="no")
    trainer = Trainer(model=Toy(), args=args, train_dataset=rows, data_collator=collate)
    trainer.train()
    counted[out] = {"world_size": args.world_size, "steps": trainer.state.global_step}
if args.process_index == 0:
    print(json.dumps(counted))
"""


@pytest.mark.slow
def test_plan_counts_steps_and_checkpoints_as_the_trainer_does_on_two_ranks(tmp_path):
    """The guide's 2,400 examples at batch 8 x accumulation 4 on 2 devices, as transformers' Trainer counts them on
    two gloo ranks: with the CPU's random batches, the GPU's batch_rebalance, and the GPU's one-pass split."""
    script = tmp_path / "count.py"
    script.write_text(TRAINER)
    res = subprocess.run([*TORCHRUN, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-5000:]
    plan = make_plan(load_config(None, ["train.save_strategy=epoch"]), examples=2400, devices=2)
    counted = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(counted) == 3 and plan.total_steps == 114
    for out, c in counted.items():
        assert c == {"world_size": 2, "steps": plan.total_steps}, (out, c)
        names = sorted((p.name for p in (tmp_path / os.path.basename(out)).iterdir()), key=lambda n: int(n[11:]))
        assert names == plan.checkpoints, (out, names)
