"""The import boundary (kit.backend): Unsloth is imported first and in one place; transformers, TRL and
PEFT come in with kit.train, which the recipe imports after activating the backend."""
import ast
import json
import os
import pkgutil
import subprocess
import sys

import kit
from tests.helpers import ROOT

BEHIND = {"kit.model", "kit.train", "kit.callbacks"}  # torch, transformers, TRL, PEFT at their top
HEAVY = ("torch", "transformers", "trl", "peft", "unsloth")


def _imports(path):
    """(imported module, imported at module level) for each import of a source file."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((a.name, id(node) in top) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield from ((f"{node.module}.{a.name}", id(node) in top) for a in node.names)


def test_importing_the_kit_and_loading_a_config_imports_no_torch_transformers_or_trl(tmp_path):
    light = sorted(m.name for m in pkgutil.walk_packages(kit.__path__, "kit.") if m.name not in BEHIND)
    assert {"kit.cli", "kit.config", "kit.recipes.llama31_sft", "kit.backend", "kit.serve"} <= set(light)
    code = ("import importlib, sys\n"
            f"for name in {light!r}:\n    importlib.import_module(name)\n"
            "from kit.config import load_config\n"
            "load_config('demo'), load_config('llama31_sft', ['train.learning_rate=2e-4'])\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_unsloth_is_imported_in_one_place_and_before_transformers_trl_and_peft(tmp_path):
    for path in (ROOT / "kit").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for name, at_top in _imports(path):
            if name.split(".")[0] == "unsloth":
                assert module == "kit.backend", f"{module} imports unsloth"
            if name in BEHIND and module not in BEHIND:
                assert module == "kit.recipes.llama31_sft" and not at_top, f"{module} imports {name}"
    # the recipe as users run it, with a stand-in Unsloth that records what was imported before it
    fake = tmp_path / "fake" / "unsloth"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import json, os, sys\n"
        "with open(os.environ['RECORD'], 'w') as f:\n"
        "    json.dump(sorted(m for m in ('transformers', 'trl', 'peft') if m in sys.modules), f)\n")
    env = dict(os.environ, PYTHONPATH=str(fake.parent), RECORD=str(tmp_path / "record.json"))
    out = subprocess.run([sys.executable, "-m", "kit.recipes.llama31_sft", "--config", "demo", "--plan"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checkpoints" in out.stdout  # the plan, computed after the backend was activated
    assert json.loads((tmp_path / "record.json").read_text()) == []
