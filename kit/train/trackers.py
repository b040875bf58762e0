"""Experiment trackers (train.report_to) through transformers' own integrations: TensorBoardCallback,
WandbCallback and MLflowCallback log the Trainer's metrics; the kit points each one's record into the run
directory, logs the run's config and manifest as the tracker run's parameters, and adds the sample answers.

Nothing needs the network: wandb runs offline unless WANDB_MODE says otherwise (`wandb sync` uploads a run
later), and MLflow writes a SQLite store in the run directory unless MLFLOW_TRACKING_URI names another.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import netrc
import re
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import urlsplit

import yaml

from kit.config.train import NO_TRACKER
from kit.core import env
from kit.core.errors import ConfigError, SetupError, install_extras
from kit.run.rundir import WANDB, RunDir, read_manifest

if TYPE_CHECKING:
    from kit.config.schema import Config

# the module each imports, and the package requirements/ pins for it
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}
SAMPLES = "eval/samples"  # the sample answers' name in each tracker
WANDB_MODES = ("offline", "online", "disabled", "shared", "dryrun", "run")  # wandb.Settings.mode's values
WANDB_UPLOADS = ("online", "shared", "run")  # the modes that need an API key
# MLflow's own stores by URI scheme (a database's driver after '+': postgresql+psycopg2); plugins add theirs
MLFLOW_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")
PROBE_SECONDS = 3.0  # how long a tracking server has to answer before training starts
LOCAL_RECORD = "unset it to record in the run directory (RUN/mlflow.db)"


def check_installed(names: list[str]) -> None:
    """Before anything loads: each tracker's package is importable."""
    missing = [n for n in names if importlib.util.find_spec(MODULES[n]) is None]
    if missing:
        packages = " and ".join(PACKAGES[n] for n in missing)
        raise SetupError(f"train.report_to names {', '.join(missing)}, but {packages} is not installed: "
                         f"{install_extras(packages)}; or leave {', '.join(missing)} out of train.report_to.")


def check(cfg: Config) -> None:
    """Before any model loads, what each tracker of train.report_to needs: its package, a valid WANDB_MODE and, to
    upload, an API key and a server that answers; an MLFLOW_TRACKING_URI that MLflow opens and whose server
    answers; and, in an existing run directory, the tracker folders writable. Waits PROBE_SECONDS per server at
    most (MLflow and wandb would retry for minutes, after the model loaded)."""
    names = cfg.train.trackers
    check_installed(names)
    problems = [*(_wandb_problems() if "wandb" in names else []), *(_mlflow_problems() if "mlflow" in names else [])]
    if not cfg.run.overwrite:  # an existing run directory is kept (resume): its tracker records are written to again
        problems += _record_problems(names, RunDir(cfg.run_dir))
    if problems:
        raise ConfigError(*problems)


def _wandb_problems() -> list[str]:
    mode = env.wandb_mode()
    if mode is None:  # the kit runs it offline
        return []
    if mode not in WANDB_MODES:
        return [f"WANDB_MODE={mode}: not a mode of wandb; use offline (the kit's default, without WANDB_MODE), online "
                "(uploads; needs an API key) or disabled."]
    if mode not in WANDB_UPLOADS:
        return []
    server = env.wandb_base_url()
    if not env.wandb_key_set() and not _netrc_key(server):
        return [f"WANDB_MODE={mode} uploads to {server}, but no API key is set: set WANDB_API_KEY, or run `wandb "
                f"login` (it keeps the key in {env.netrc_path()}); or unset WANDB_MODE to record offline in the run "
                "directory (`wandb sync RUN/wandb/offline-run-*` uploads it later)."]
    if why := _silence(server):
        return [f"WANDB_MODE={mode}: the W&B server {server} does not answer ({why}). Check the network or "
                "WANDB_BASE_URL, or unset WANDB_MODE to record offline (`wandb sync` uploads it later)."]
    return []


def _netrc_key(server: str) -> bool:
    """Whether the netrc file holds credentials for the W&B server (as `wandb login` writes them)."""
    try:
        return netrc.netrc(env.netrc_path()).authenticators(urlsplit(server).netloc) is not None
    except (OSError, netrc.NetrcParseError):  # no file, or one wandb cannot read either
        return False


def _mlflow_problems() -> list[str]:
    uri = env.mlflow_tracking_uri()
    if uri is None:  # the kit's SQLite store in the run directory
        return []
    scheme = urlsplit(uri).scheme
    if scheme in ("", "file"):
        if env.mlflow_allows_file_store():
            return []
        return [f"MLFLOW_TRACKING_URI={uri} is MLflow's file store, which MLflow 3 refuses (maintenance mode). Use a "
                f"SQLite store (sqlite:///PATH/mlflow.db) or a server (http://HOST:5000), or {LOCAL_RECORD}; "
                "MLFLOW_ALLOW_FILE_STORE=true opens the file store anyway."]
    plugins = {e.name for e in importlib.metadata.entry_points(group="mlflow.tracking_store")}
    if scheme.split("+")[0] not in {*MLFLOW_SCHEMES, *plugins}:
        return [f"MLFLOW_TRACKING_URI={uri}: MLflow has no store for '{scheme}:'. Use http(s)://HOST:PORT (a tracking "
                f"server), sqlite:///PATH, postgresql://, mysql:// or mssql:// (a database), databricks, or "
                f"{LOCAL_RECORD}."]
    if scheme in ("http", "https") and (why := _silence(uri)):
        return [f"MLFLOW_TRACKING_URI={uri}: the tracking server does not answer ({why}). Start it, correct the "
                f"address, or {LOCAL_RECORD}."]
    if scheme == "sqlite" and (db := uri.removeprefix("sqlite:///")) not in ("", ":memory:", uri):
        why = _unwritable(Path(db), folder=False) or _unwritable(Path(db).parent, folder=True, missing="no such folder")
        return [f"MLFLOW_TRACKING_URI={uri}: {why}. Give a SQLite file in a folder you can write, or {LOCAL_RECORD}."] \
            if why else []
    return []


def _silence(url: str) -> Optional[str]:
    """Why the server at `url` gives no HTTP answer within PROBE_SECONDS (None: it answers, whatever the status)."""
    outcome: dict[str, str] = {}

    def probe():
        try:
            urllib.request.urlopen(url, timeout=PROBE_SECONDS).close()
        except urllib.error.HTTPError:  # an answer: the server is there
            pass
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            outcome["error"] = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
            return
        outcome["ok"] = ""

    thread = threading.Thread(target=probe, daemon=True)  # a thread: name resolution has no timeout of its own
    thread.start()
    thread.join(PROBE_SECONDS + 0.5)
    return None if "ok" in outcome else outcome.get("error", f"no answer in {PROBE_SECONDS:g} s")


def _record_problems(names: list[str], run: RunDir) -> list[str]:
    """What an existing run directory's tracker records would refuse: a folder that is a file, a read-only one."""
    local_mlflow = "mlflow" in names and env.mlflow_tracking_uri() is None
    records = [*([("tensorboard", run.tensorboard, True)] if "tensorboard" in names else []),
               *([("wandb", run.path / WANDB, True)] if "wandb" in names else []),
               *([("mlflow", run.mlflow_db, False), ("mlflow", run.mlflow_artifacts, True)] if local_mlflow else [])]
    return [f"{why}; train.report_to's {name} records there. Move it aside or make it writable, or leave {name} out "
            "of train.report_to." for name, path, folder in records if (why := _unwritable(path, folder))]


def _unwritable(path: Path, folder: bool, missing: Optional[str] = None) -> Optional[str]:
    """Why `path` (a folder or a file) cannot be written, by trying (root writes past permission bits); None when
    it can, or when it does not exist yet and `missing` is None (it is created then)."""
    if not path.exists():
        return f"{path}: {missing}" if missing else None
    if path.is_dir() != folder:
        return f"{path} is a {'file' if folder else 'folder'}, not a {'folder' if folder else 'file'}"
    try:
        if folder:
            tempfile.TemporaryFile(dir=path).close()
        else:
            open(path, "r+b").close()
    except OSError as e:
        return f"{path} cannot be written ({e.strerror})"
    return None


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

