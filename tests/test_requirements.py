"""The GPU environments' requirement files agree with their locks, training keeps the torch its speed needs,
every requirements file the Dockerfile and the guides name exists, and make never reinstalls an environment that
make setup-gpu made with the CPU wheels."""
import re
import subprocess

import pytest

from tests.helpers import ROOT

REQUIREMENTS = ROOT / "requirements"


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (REQUIREMENTS / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            package, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", package).lower()] = version
    return pins


@pytest.mark.parametrize("env", ["gpu-train", "gpu-serve"])
def test_each_pin_of_a_gpu_environment_is_the_version_its_lock_fixes(env):
    wanted, lock = _pins(f"{env}.txt"), _pins(f"{env}-lock.txt")
    assert wanted, env
    assert {p: v for p, v in wanted.items() if lock.get(p) != v} == {}, env


def test_the_cpu_freeze_has_the_no_deps_packages_the_gpu_setup_installs():
    apart = _pins("tokenizer.txt")
    assert len(apart) == 2 and {p: _pins("cpu-train.txt").get(p) for p in apart} == apart


def test_training_has_torch_with_gqa_varlen_and_serving_keeps_vllms_torch_apart():
    train, serve = _pins("gpu-train-lock.txt"), _pins("gpu-serve-lock.txt")
    # torch 2.12's varlen attention takes enable_gqa: Unsloth then runs padding-free batches in one call a layer
    assert tuple(int(x) for x in train["torch"].split(".")[:2]) >= (2, 12)
    assert "vllm" not in train
    assert "vllm" in serve and serve["torch"] != train["torch"]


def test_every_requirements_file_the_image_and_guides_name_exists():
    named = set()
    for doc in ["Dockerfile", "README.md", "docs/ko/README.md", "docs/docker.md", "Makefile", "kit/core/errors.py"]:
        named |= set(re.findall(r"requirements/([\w.-]+\.txt)", (ROOT / doc).read_text()))
    assert named and {n for n in named if not (REQUIREMENTS / n).is_file()} == set()


@pytest.mark.parametrize("made_for_gpu", [False, True])
def test_make_demo_serve_and_extras_keep_environments_that_setup_gpu_made(tmp_path, made_for_gpu):
    venv, serve = tmp_path / "venv", tmp_path / "venv-serve"
    for env in (venv, serve):
        env.mkdir()
        if made_for_gpu:
            (env / ".kit-gpu").touch()
    plan = subprocess.run(["make", "-n", "demo", "serve", "setup-extras", f"VENV={venv}", f"SERVE={serve}"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
    installs = [line.split()[-1] for line in plan.splitlines() if "requirements/install.py" in line]
    if made_for_gpu:  # installing the CPU wheels there would replace the CUDA torch
        assert installs == [] and f"{venv}/bin/python -m kit.cli serve" in plan
    else:  # the demo's lm-eval part of the extras first, then all of them for setup-extras
        assert installs == ["requirements/cpu-train.txt", f"{venv}/kit-eval.txt", "requirements/cpu-serve.txt",
                            "requirements/cpu-extras.txt"]
