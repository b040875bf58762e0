"""What kit studio asks of the kit, in one module: every import of a kit internal is here, so that a move of
those modules changes only these lines. Each function answers one of the page's JSON requests with the kit's own
functions (config, plan, run directory, generation, export), never a second copy of them."""
from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import shlex
import sys
import threading
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from kit.config.export import FORMATS, QUANTS
from kit.config.load import load_config, shipped_recipes, to_dict, to_yaml
from kit.config.schema import Config, field_docs
from kit.core.env import API_KEY_ENV, api_key
from kit.core.errors import ConfigError, KitError
from kit.recipes.llama31_sft import MODULE as TRAIN_MODULE
from kit.recipes.steps import plan_without_data
from kit.run.rundir import ADAPTER_WEIGHTS, COMPLETE, LOCK, RunDir, checkpoint_name, read_growing_metrics, read_manifest
from kit.serve.launcher import LOOPBACK

CLI_MODULE = "kit.cli"  # python -m kit.cli export ...
__all__ = ["API_KEY_ENV", "FORMATS", "LOOPBACK", "QUANTS", "RunDir", "api_key"]  # the kit's own, for the server
Error = KitError  # the errors a user can fix: their message is the CLI's "error: ..." line


def cli_message(e: KitError) -> str:
    """The line the kit's commands print for `e` (kit.errors.exit_with) before exiting 2."""
    return f"error: {e}"


# ---------------------------------------------------------------- the config form and the plan

def schema() -> dict:
    """Each section of the config with its fields: key, default (as YAML), doc, and the choices of a Literal."""
    sections = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        docs, hints, default = field_docs(cls), typing.get_type_hints(cls), cls()
        fields = [{"key": f"{section.name}.{f.name}", "doc": docs.get(f.name, ""),
                   "default": as_text(getattr(default, f.name)), "choices": _choices(hints[f.name])}
                  for f in dataclasses.fields(cls)]
        sections.append({"name": section.name, "fields": fields})
    return {"sections": sections, "recipes": shipped_recipes(), "formats": list(FORMATS),
            "quants": list(QUANTS)}


def _choices(hint: Any) -> Optional[list[str]]:
    """The values a select offers: a Literal's (with null when it is Optional), true and false for a bool."""
    if hint is bool:
        return ["true", "false"]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        return [as_text(v) for v in args]
    inner = [a for a in args if a is not type(None)]
    if len(inner) == 1 and len(args) == 2 and typing.get_origin(inner[0]) is Literal:
        return [as_text(v) for v in typing.get_args(inner[0])] + ["null"]
    return None


def as_text(value: Any) -> str:
    """A value as an override writes it (YAML, on one line)."""
    if value == "no":  # the strategies' choice: kit.config reads a bare no (YAML's false) as "no"
        return value
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6).strip().removesuffix(
        "\n...").removesuffix("...").strip()


def flat(data: dict, prefix: str = "") -> dict[str, str]:
    """A nested config mapping as dotted key -> the override text of its value."""
    out: dict[str, str] = {}
    for k, v in data.items():
        if isinstance(v, dict) and not prefix:
            out.update(flat(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = as_text(v)
    return out


def check_recipe(recipe: str) -> str:
    """Only the recipes shipped in the kit are read: a name from the page never becomes a path."""
    if recipe not in shipped_recipes():
        raise ConfigError(f"recipe '{recipe}': not a recipe shipped in the kit; choose one of "
                          f"{', '.join(shipped_recipes())}.")
    return recipe


def recipe_values(recipe: str) -> dict[str, str]:
    return flat(to_dict(load_config(check_recipe(recipe))))


def config(recipe: str, overrides: list[str]) -> Config:
    """load_config as the CLI calls it: ConfigError with every problem, each naming its override."""
    return load_config(check_recipe(recipe), overrides)


def plan(recipe: str, overrides: list[str], examples: int) -> dict:
    """`--plan --examples N`: its command and the text it prints, with the GPU memory estimate."""
    cfg = config(recipe, overrides)
    result = plan_without_data(cfg, examples)
    memory = result.execution.memory if result.execution else None
    return {"command": command_line([*train_command(recipe, overrides, None), "--plan", "--examples", str(examples)]),
            "plan": result.render(), "total_steps": result.total_steps,
            "memory": memory.render() if memory else None, "fits": memory.fits if memory else None,
            "budget_gib": cfg.model.gpu_memory_gib}


def yaml_text(recipe: str, overrides: list[str]) -> str:
    return to_yaml(config(recipe, overrides))


def imported(text: str) -> dict[str, str]:
    """A recipe's YAML as the form's values; ConfigError when it is not a mapping of sections."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"the imported YAML is not valid ({getattr(e, 'problem', None) or e}).") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError("the imported YAML is not a recipe: a mapping of sections (model:, lora:, train:, ...).")
    given = flat(data)
    # checked and read as the kit reads a recipe (save_strategy: no is YAML's false, read as "no")
    values = flat(to_dict(load_config(None, [f"{k}={v}" for k, v in given.items()])))
    return {k: values[k] for k in given}


def train_command(recipe: str, overrides: list[str], runs: Optional[Path]) -> list[str]:
    """The command that starts the run; `runs`: the studio's runs folder, where the run goes (None: as set)."""
    where = [f"run.output_dir={runs}"] if runs is not None else []
    return [sys.executable, "-m", TRAIN_MODULE, "--config", check_recipe(recipe), *overrides, *where]


def export_command(run: Path, to: str, quant: str) -> list[str]:
    return [sys.executable, "-m", CLI_MODULE, "export", str(run), "--to", to, *(["--quant", quant] if to == "gguf"
                                                                                else [])]


def command_line(argv: list[str]) -> str:
    """A command as a person types it: python -m ..."""
    return shlex.join(["python", *argv[1:]] if argv and argv[0] == sys.executable else argv)


# ---------------------------------------------------------------- runs

def _in_use(run: RunDir) -> bool:
    """A process trains in the run: it holds the lock that kit.rundir.claim takes."""
    lock = run.path / LOCK
    if not lock.is_file():
        return False
    with open(lock, encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def _resumable(run: RunDir) -> bool:
    return any((d / COMPLETE).exists() for d in run.checkpoints.glob(checkpoint_name("*")))


def summary(run: RunDir) -> dict:
    """The Runs page's row of one run directory: status (planned, training, finished, failed, resumable, or
    damaged with the reason and what to do), model, data, steps, best eval loss."""
    out: dict[str, Any] = {"name": run.path.name, "status": "planned", "model": None, "data": None, "step": 0,
                           "total_steps": None, "best_eval_loss": None, "problem": None, "manifest": None}
    try:
        manifest = read_manifest(run) if run.manifest.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        return {**out, "status": "damaged", "problem": f"{run.manifest} cannot be read ({e}): the run directory is "
                "half written. Train it again (run.overwrite=true) or move it out of the runs folder."}
    rows, out["problem"] = read_growing_metrics(run.metrics)
    steps = [r["step"] for r in rows if isinstance(r.get("step"), int)]
    evals = [r["eval_loss"] for r in rows if isinstance(r.get("eval_loss"), (int, float))]
    out.update(step=max(steps, default=0), best_eval_loss=min(evals, default=None))
    if run.config.is_file():
        try:
            cfg = yaml.safe_load(run.config.read_text(encoding="utf-8")) or {}
            out.update(model=cfg.get("model", {}).get("name"), data=as_text(cfg.get("data", {}).get("path")))
        except (yaml.YAMLError, AttributeError) as e:
            out["problem"] = f"{run.config} cannot be read ({e})"
    if manifest is None:
        out["status"] = "training" if _in_use(run) else "planned"
        return out
    result = manifest.get("result") or {}
    out.update(manifest=manifest, model=manifest.get("model_name", out["model"]),
               data=as_text(manifest.get("dataset", {}).get("path")) or out["data"],
               total_steps=result.get("total_steps") or manifest.get("plan", {}).get("total_steps"))
    if result:
        out.update(status="finished", best_eval_loss=result.get("best_eval_loss", out["best_eval_loss"]))
    elif manifest.get("status") == "training" and _in_use(run):
        out["status"] = "training"
    else:
        out["status"] = "resumable" if _resumable(run) else "failed"
    return out


def exports(run: RunDir) -> dict:
    """The run's exports: merged16's folder, each GGUF file and its Ollama Modelfile."""
    ggufs = [{"path": str(f), "modelfile": (f.parent / "Modelfile").read_text(encoding="utf-8")
              if (f.parent / "Modelfile").is_file() else None} for f in run.gguf_files()]
    return {"merged16": str(run.merged16) if run.merged16.is_dir() else None, "gguf": ggufs,
            "adapter": run.adapter.is_dir()}


def evaluation(run: RunDir) -> Optional[dict]:
    """kit eval's scores as manifest.json records them (kit.rundir.record_evaluation), when any."""
    try:
        return read_manifest(run).get("evaluation") if run.manifest.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None


# ---------------------------------------------------------------- compare: base and fine-tune, locally

_generating = threading.Lock()  # one generation at a time: the machine's cores are shared with training


@functools.lru_cache(maxsize=1)
def _model(run_dir: str, mtime: float):
    """The run's base + adapter (kit.infer), loaded once per adapter version (`mtime`)."""
    from kit.eval.infer import load_adapter_model
    return load_adapter_model(Path(run_dir))


def answers(run: RunDir, prompt: str, max_new_tokens: int) -> dict:
    """One prompt answered greedily by the fine-tune and by its base (the same model with the adapter off)."""
    from kit.eval.infer import generate
    adapter_weights = run.adapter / ADAPTER_WEIGHTS
    if not adapter_weights.is_file():
        raise ConfigError(f"{run.path}: no trained adapter yet ({adapter_weights}); wait for the run to finish.")
    messages = [{"role": "user", "content": prompt}]
    with _generating:
        model, tokenizer = _model(str(run.path), adapter_weights.stat().st_mtime)
        tuned = generate(model, tokenizer, messages, max_new_tokens)
        with model.disable_adapter():
            base = generate(model, tokenizer, messages, max_new_tokens)
    return {"base": base, "fine_tune": tuned}
