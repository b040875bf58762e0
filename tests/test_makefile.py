"""What each make target sets up before it runs (make -n -B: every step it would take, none taken): the demo waits
only for the training environment and lm-eval (no llama.cpp, no vLLM); the tests for everything; serving for the
serving environment. And what the installer shows while pip works."""
import importlib.util
import subprocess

import pytest

from tests.helpers import ROOT

TRAIN = "requirements/install.py .venv requirements/cpu-train.txt"
EXTRAS = "requirements/install.py .venv requirements/cpu-extras.txt"
SERVE = "requirements/install.py .venv-serve requirements/cpu-serve.txt"
EVAL = "requirements/install.py .venv .venv/kit-eval.txt"  # kit eval's part of cpu-extras.txt


def _steps(target: str) -> str:
    return subprocess.run(["make", "-n", "-B", "-C", str(ROOT), target], capture_output=True, text=True,
                          check=True, timeout=60).stdout


@pytest.mark.parametrize("target, installs, leaves_out", [
    ("demo", [TRAIN, EVAL], [EXTRAS, SERVE]),
    ("test", [TRAIN, EXTRAS, SERVE], []),
    ("serve", [TRAIN, SERVE], [EXTRAS]),
    ("setup-extras", [TRAIN, EXTRAS], [SERVE]),
])
def test_a_target_installs_what_it_needs_and_no_more(target, installs, leaves_out):
    steps = _steps(target)
    for install in installs:
        assert install in steps, (target, install)
    for install in leaves_out:
        assert install not in steps, (target, install)


def test_the_demo_trains_the_smollm2_recipe_once_its_environment_is_ready_then_compares():
    steps = _steps("demo").splitlines()
    train = next(k for k, s in enumerate(steps)
                 if s.startswith(".venv/bin/python -m kit.recipes.llama31_sft --config smollm2 run.overwrite=true"))
    compare = next(k for k, s in enumerate(steps) if s.startswith(".venv/bin/python -m kit.cli compare runs/smollm2"))
    assert steps.index("touch .venv/.kit-ready") < steps.index("touch .venv/.kit-eval") < train < compare


def test_the_demos_part_of_the_extras_is_lm_eval_without_llama_cpp():
    extract = next(s for s in _steps("demo").splitlines() if s.startswith("sed ")).split(" > ")[0]
    pins = subprocess.run(extract, shell=True, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    names = {line.split("==")[0].lower() for line in pins.splitlines() if "==" in line}
    assert {"lm_eval", "rouge_score", "evaluate", "sacrebleu"} <= names
    assert not names & {"llama_cpp_python", "wandb", "mlflow-skinny"}


def test_the_installer_shows_a_numbered_line_per_package_and_builds():
    spec = importlib.util.spec_from_file_location("install", ROOT / "requirements" / "install.py")
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    pip_output = [
        "Looking in indexes: https://pypi.org/simple\n",
        "Processing /opt/pypi/files/six-1.17.0-py2.py3-none-any.whl (from -r r.txt (line 1))\n",
        "Collecting llama_cpp_python==0.3.36 (from -r r.txt (line 2))\n",
        "  Downloading llama_cpp_python-0.3.36.tar.gz (50.0 MB)\n",
        "     ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 50.0/50.0 MB 44.6 MB/s eta 0:00:00\n",
        "Building wheels for collected packages: llama_cpp_python\n",
        "  Building wheel for llama_cpp_python (pyproject.toml): started\n",
        "  Building wheel for llama_cpp_python (pyproject.toml): still running...\n",
        "Installing collected packages: six, llama_cpp_python\n",
        "Successfully installed llama_cpp_python-0.3.36 six-1.17.0\n",
    ]
    assert list(install.progress(pip_output, 2)) == [
        "  1/2 six-1.17.0-py2.py3-none-any.whl",
        "  2/2 llama_cpp_python==0.3.36",
        "    downloading 50.0 MB",
        "  Building wheels for collected packages: llama_cpp_python",
        "  Building wheel for llama_cpp_python (pyproject.toml): started",
        "  Building wheel for llama_cpp_python (pyproject.toml): still running...",
        "  installing them (pip is silent until all 2 are in place) ...",
    ]


def test_the_tests_install_the_browser_kit_studio_drives_only_when_it_is_missing(tmp_path):
    missing = subprocess.run(["make", "-n", "-C", str(ROOT), "test", f"CHROMIUM={tmp_path / 'chromium'}"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    assert "apt-get install -y --no-install-recommends chromium chromium-driver fonts-noto-cjk" in missing
    (tmp_path / "chromium").touch()
    present = subprocess.run(["make", "-n", "-C", str(ROOT), "setup-browser", f"CHROMIUM={tmp_path / 'chromium'}"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    assert "apt-get" not in present
