"""Experiment trackers (train.report_to) through transformers' own integrations: TensorBoardCallback,
WandbCallback and MLflowCallback log the Trainer's metrics; the kit points each one's record into the run
directory, logs the run's config and manifest as the tracker run's parameters, and adds the sample answers.

Nothing needs the network: wandb runs offline unless WANDB_MODE says otherwise (`wandb sync` uploads a run
later), and MLflow writes a SQLite store in the run directory unless MLFLOW_TRACKING_URI names another.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import re
from collections.abc import Iterator
from typing import Any

import yaml

from kit import env
from kit.errors import SetupError, install_extras
from kit.rundir import RunDir, read_manifest

TRACKERS = ("tensorboard", "wandb", "mlflow")
NO_TRACKER = "none"
# the module each imports, and the package requirements/ pins for it
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}
SAMPLES = "eval/samples"  # the sample answers' name in each tracker


def check_installed(names: list[str]) -> None:
    """Before anything loads: each tracker's package is importable."""
    missing = [n for n in names if importlib.util.find_spec(MODULES[n]) is None]
    if missing:
        packages = " and ".join(PACKAGES[n] for n in missing)
        raise SetupError(f"train.report_to names {', '.join(missing)}, but {packages} is not installed: "
                         f"{install_extras(packages)}; or leave {', '.join(missing)} out of train.report_to.")


def integrations(names: list[str]) -> list[str]:
    """What reaches SFTConfig.report_to: TensorBoard is the kit's own callback (its writer is shared with the
    sample answers), the others are transformers' integrations as they are."""
    return [n for n in names if n != "tensorboard"] or [NO_TRACKER]


def environment(names: list[str], run: RunDir) -> dict[str, str]:
    """The variables WandbCallback's wandb.init reads: its run folder under the run directory (in wandb/), and
    offline unless the user chose a mode."""
    if "wandb" not in names:
        return {}
    return {"WANDB_DIR": str(run.path.resolve()), "WANDB_MODE": env.wandb_mode() or "offline"}


@contextlib.contextmanager
def recording(names: list[str], run: RunDir, main: bool) -> Iterator[None]:
    """Training inside the block records into the run directory; the tracker runs are closed after it (failed
    if it raised), so that another run in this process starts its own."""
    if "mlflow" in names and main and env.mlflow_tracking_uri() is None:
        _local_mlflow(run)
    with env.setting(environment(names, run)):
        try:
            yield
        except BaseException:
            _finish(names, failed=True)
            raise
        _finish(names, failed=False)


def _local_mlflow(run: RunDir) -> None:
    """A SQLite store in the run directory, and an experiment named after the run whose artifacts stay there too
    (the store's default artifact root is relative to the working directory). MLflowCallback starts its run in
    it; a resumed run adds a run to the same experiment."""
    import mlflow
    mlflow.set_tracking_uri(f"sqlite:///{run.mlflow_db.resolve()}")
    found = mlflow.get_experiment_by_name(run.name)
    mlflow.set_experiment(experiment_id=found.experiment_id if found else mlflow.create_experiment(
        run.name, artifact_location=run.mlflow_artifacts.resolve().as_uri()))


def _finish(names: list[str], failed: bool) -> None:
    if "wandb" in names:
        import wandb
        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)
    if "mlflow" in names:
        import mlflow
        if mlflow.active_run() is not None:  # MLflowCallback ends its run when training ends, not when it fails
            mlflow.end_run(status="FAILED" if failed else "FINISHED")


def log_record(names: list[str], run: RunDir, writer=None) -> None:
    """The run's config.yaml and manifest.json as the tracker run's parameters (and, in TensorBoard, as text),
    once they are written and the integrations have started their runs."""
    config_text = run.config.read_text(encoding="utf-8")
    config = yaml.safe_load(config_text)
    manifest = read_manifest(run)
    if writer is not None:
        writer.add_text("kit/config", _code(config_text))
        writer.add_text("kit/manifest", _code(json.dumps(manifest, indent=2, ensure_ascii=False)))
    if "wandb" in names:
        import wandb
        if wandb.run is not None:
            wandb.config.update({"kit": config, "manifest": manifest}, allow_val_change=True)
    if "mlflow" in names:
        import mlflow
        if mlflow.active_run() is None:
            return
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
        params = list(parameters({"kit": config, "manifest": manifest}, MAX_PARAM_VAL_LENGTH).items())
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            mlflow.log_params(dict(params[i:i + MAX_PARAMS_TAGS_PER_BATCH]))
        mlflow.log_artifact(str(run.config))  # whole, where a parameter is cut at MLflow's length limit
        mlflow.log_artifact(str(run.manifest))


def parameters(tree: dict, limit: int, prefix: str = "") -> dict[str, str]:
    """Nested settings as flat dotted names (kit.train.learning_rate), in the characters MLflow allows in a
    parameter's name, each value as text of at most `limit` characters."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = re.sub(r"[^0-9A-Za-z_\-. :/]", "_", f"{prefix}{key}")
        if isinstance(value, dict) and value:
            flat.update(parameters(value, limit, f"{name}."))
        else:
            flat[name] = (value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))[:limit]
    return flat


def log_samples(names: list[str], step: int, rows: list[dict[str, Any]], writer=None) -> None:
    """Sample answers ({question, answer, reference}) of the evaluation at `step`: a table in TensorBoard's text
    tab and in W&B, a JSON artifact per evaluation in MLflow."""
    if writer is not None:
        writer.add_text(SAMPLES, _table(rows), step)
        writer.flush()
    if "wandb" in names:
        import wandb
        if wandb.run is not None:
            columns = list(rows[0])
            table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
            wandb.log({SAMPLES: table, "train/global_step": step})  # WandbCallback's step axis
    if "mlflow" in names:
        import mlflow
        if mlflow.active_run() is not None:
            mlflow.log_dict(rows, f"{SAMPLES}/step-{step:07d}.json")


def _table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table, as TensorBoard's text tab renders it."""
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    columns = list(rows[0])
    return "\n".join([" | ".join(columns), " | ".join("---" for _ in columns)]
                     + [" | ".join(cell(r[c]) for c in columns) for r in rows])


def _code(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())  # Markdown code: shown as written

