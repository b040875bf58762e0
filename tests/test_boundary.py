"""The kit's imports: its packages in layers, each importing only its own layer and those below it, with no
circle between modules; and the import boundary (kit.train.backend): Unsloth is imported first and in one place;
transformers, TRL and PEFT come in with kit.train.trainer, which the recipe's steps import after activating the
backend."""
import ast
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import kit
from tests.helpers import ROOT

# The kit's packages, lowest first: a module may import its own package and those before it, never one after it.
LAYERS = ("kit.core", "kit.models", "kit.config", "kit.run", "kit.data", "kit.train", "kit.export", "kit.serve",
          "kit.eval", "kit.recipes", "kit.studio", "kit.cli", "kit.__main__")
BEHIND = {"kit.train.model", "kit.train.trainer", "kit.train.callbacks"}  # torch, transformers, TRL, PEFT at their top
MAIN = "kit.__main__"  # runs the kit command when imported
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


def _modules() -> dict[str, Path]:
    """Each module of the kit by its dotted name (a package by its __init__.py)."""
    modules = {}
    for path in (ROOT / "kit").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _graph() -> dict[str, set[str]]:
    """module -> the kit's modules it imports, wherever the import stands (at the top, in a function, for type
    checking only): `from kit.a import b` names the module kit.a.b if there is one, else kit.a."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        graph[module] = set()
        for name, _ in _imports(path):
            while name not in modules and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in modules and name.startswith("kit.") and name != module:
                graph[module].add(name)
    return graph


def _layer(module: str) -> int:
    return max((i for i, p in enumerate(LAYERS) if module == p or module.startswith(p + ".")), default=-1)


def test_every_module_is_in_a_layer_and_the_top_holds_only_packages_and_the_command():
    assert {m: _layer(m) for m in _modules() if m != "kit" and _layer(m) < 0} == {}
    assert sorted(p.name for p in (ROOT / "kit").glob("*.py")) == ["__init__.py", "__main__.py", "cli.py"]


def test_no_package_imports_one_above_it():
    upward = sorted(f"{a} imports {b}" for a, deps in _graph().items() for b in deps if _layer(b) > _layer(a))
    assert upward == [], f"the layers, lowest first: {', '.join(LAYERS)}"


def test_no_module_imports_itself_through_others():
    graph, done, cycles = _graph(), set(), []

    def visit(module, path):
        if module in path:
            cycles.append(" -> ".join(path[path.index(module):] + [module]))
            return
        if module in done:
            return
        for dep in sorted(graph[module]):
            visit(dep, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert cycles == []


def test_importing_the_kit_and_loading_a_config_imports_no_torch_transformers_or_trl(tmp_path):
    light = sorted(m.name for m in pkgutil.walk_packages(kit.__path__, "kit.") if m.name not in BEHIND | {MAIN})
    assert {"kit.cli", "kit.config.load", "kit.recipes.llama31_sft", "kit.train.backend",
            "kit.serve.launcher"} <= set(light)
    code = ("import importlib, sys\n"
            f"for name in {light!r}:\n    importlib.import_module(name)\n"
            "from kit.config.load import load_config\n"
            "load_config('demo'), load_config('llama31_sft', ['train.learning_rate=2e-4'])\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_unsloth_is_imported_in_one_place_and_before_transformers_trl_and_peft(tmp_path):
    for module, path in _modules().items():
        for name, at_top in _imports(path):
            if name.split(".")[0] == "unsloth":
                assert module == "kit.train.backend", f"{module} imports unsloth"
            if name in BEHIND and module not in BEHIND:
                assert module == "kit.recipes.steps" and not at_top, f"{module} imports {name}"
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


def test_python_m_kit_is_the_kit_command(tmp_path):
    helps = [subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120) for module in ("kit", "kit.cli")]
    assert helps[0].returncode == 0 and helps[0].stdout.startswith("usage: kit "), helps[0].stderr
    assert helps[0].stdout == helps[1].stdout
