import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run through the device tool (see docs/benchmarks.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    from kit.chat import load_tokenizer
    return load_tokenizer("bundled")


def run_recipe(args, cwd, timeout=1200, check=True):
    """Run the recipe as a user does, in a subprocess; returns CompletedProcess."""
    import subprocess
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    res = subprocess.run([sys.executable, "-m", "kit.recipes.llama31_sft", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"recipe failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The README's demo, exactly as configured, trained once per session into a temporary runs/."""
    cwd = tmp_path_factory.mktemp("demo")
    res = run_recipe(["--config", str(ROOT / "recipes" / "demo.yaml"), f"run.output_dir={cwd / 'runs'}"], cwd=cwd)
    return cwd / "runs" / "demo", res


def train_rows(run_dir):
    """The demo's training rows (its eval split held out), as the recipe split them."""
    from kit.config import load_config
    from kit.data import load_rows, split_eval
    cfg = load_config(run_dir / "config.yaml")
    rows, _ = split_eval(load_rows(cfg.data.path), cfg.data.eval_ratio, cfg.train.seed, cfg.data.path)
    return rows
