"""A non-editable install (pip install . into a fresh virtual environment) runs from its own files: the
recipes and the sample data are package data, nothing is read from a checkout."""
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def _run(*cmd, cwd=None, timeout=600):
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the fresh environment's bin/, a working folder outside the checkout)."""
    work = tmp_path_factory.mktemp("install")
    src = work / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT / "kit", src / "kit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", work / "wheels", src)
    venv = work / "venv"
    _run(sys.executable, "-m", "venv", venv)
    wheels = (work / "wheels").glob("kit-*.whl")
    _run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", *wheels)
    # the dependencies (torch, Unsloth, ...) come from this environment; a path added by a .pth file has its
    # own .pth files ignored, so this environment's editable kit stays out of sight
    site = _run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout
    Path(site.strip(), "kit-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (work / "cwd").mkdir()
    return venv / "bin", work / "cwd"


def test_installed_kit_plans_from_its_packaged_recipe(installed):
    bin_dir, cwd = installed
    where = _run(bin_dir / "python", "-c", "import kit; print(kit.__file__)", cwd=cwd).stdout
    assert str(bin_dir.parent) in where and str(ROOT) not in where
    out = _run(bin_dir / "kit", "train", "--plan", "--examples", "2400", "train.save_strategy=epoch", cwd=cwd).stdout
    assert "checkpoint-75, checkpoint-150, checkpoint-225" in out
    assert _run(bin_dir / "kit", "train", "--help", cwd=cwd).stdout.startswith("usage: kit train")


def test_installed_kit_trains_the_demo_and_answers(installed):
    bin_dir, cwd = installed
    short = ["data.max_examples=24", "train.num_train_epochs=1"]  # the demo's recipe, one short epoch
    out = _run(bin_dir / "kit", "train", "--config", "demo", "run.output_dir=runs", *short, cwd=cwd, timeout=900)
    run = cwd / "runs" / "demo"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["command"] == "kit train --config demo run.output_dir=runs " + " ".join(short)
    assert manifest["model_name"] == "random:tiny" and manifest["dataset"]["path"] == "kit:ko_sample"
    assert manifest["result"]["steps"] == manifest["plan"]["total_steps"] == 3 and "training finished" in out.stdout
    answer = _run(bin_dir / "kit", "ask", run, "--prompt", "독일의 수도는?", "--max-new-tokens", "8", cwd=cwd)
    # the same run through transformers' own generate (not the kit's), equal up to a near-tie (tests/helpers.py)
    from kit.eval.infer import load_adapter_model
    from tests.helpers import decided_greedy_text
    model, tok = load_adapter_model(run)
    decided = decided_greedy_text(model, tok, [{"role": "user", "content": "독일의 수도는?"}], 8, 0.01)
    assert answer.stdout.endswith("\n") and answer.stdout.startswith(decided)
