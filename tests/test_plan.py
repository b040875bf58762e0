import subprocess
import sys

from kit.config.load import load_config
from kit.train.plan import make_plan


def test_guide_example_2400_examples_batch8_accum4():
    cfg = load_config(None, ["train.per_device_train_batch_size=8", "train.gradient_accumulation_steps=4",
                             "train.num_train_epochs=3", "train.save_strategy=epoch", "train.eval_strategy=epoch",
                             "train.warmup_ratio=0.1"])
    plan = make_plan(cfg, examples=2400, eval_examples=100)
    assert plan.effective_batch == 32
    assert plan.steps_per_epoch == 75
    assert plan.total_steps == 225
    assert plan.checkpoints == ["checkpoint-75", "checkpoint-150", "checkpoint-225"]
    assert plan.eval_at == [75, 150, 225]
    assert plan.warmup_steps == 23  # ceil(0.1 * 225), as the Trainer counts
    assert plan.max_tokens_per_step == 32 * 2048


def test_guide_example_10000_examples_batch10():
    cfg = load_config(None, ["train.per_device_train_batch_size=10", "train.gradient_accumulation_steps=1",
                             "train.num_train_epochs=1"])
    assert make_plan(cfg, examples=10_000).total_steps == 1000


def test_steps_strategy_max_steps_and_final_checkpoint():
    cfg = load_config(None, ["train.max_steps=250", "train.save_strategy=steps", "train.save_steps=100",
                             "train.eval_steps=50", "train.warmup_steps=10"])
    plan = make_plan(cfg, examples=1000, eval_examples=10)
    assert plan.total_steps == 250 and plan.warmup_steps == 10
    assert plan.checkpoints == ["checkpoint-100", "checkpoint-200", "checkpoint-250"]
    assert plan.eval_at == [50, 100, 150, 200, 250]


def test_plan_cli_prints_guide_numbers_without_loading_anything():
    out = subprocess.run([sys.executable, "-m", "kit.recipes.llama31_sft", "--plan", "--examples", "2400",
                          "train.save_strategy=epoch"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "75" in out.stdout and "checkpoint-75, checkpoint-150, checkpoint-225" in out.stdout
    assert "225" in out.stdout
