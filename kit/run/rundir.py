"""A run directory: its layout, its lifecycle, and the one reader (and writer) of each artifact in it. One module
(over 400 lines) on purpose: every name below and every read or write of it is here, so that no stage keeps its own.

    runs/<run.name>/
      config.yaml                 the resolved configuration
      manifest.json               what ran, on what, with which data; the results
      metrics.jsonl               every train and eval log, one JSON line with its step
      tensorboard/                event files (train.report_to: tensorboard)
      wandb/                      Weights & Biases' run folders (train.report_to: wandb; offline by default)
      mlflow.db, mlflow-artifacts/  MLflow's store and artifacts (train.report_to: mlflow)
      loss.png                    train and eval loss
      base-model/                 the random-weight base (model.name=random:*)
      checkpoints/checkpoint-N/   Trainer checkpoints, complete once kit-complete is written into them
      adapter/                    the PEFT adapter + tokenizer with Llama 3.1's chat template
      export/merged16/            kit export --to merged16
      export/gguf-<quant>/        kit export --to gguf (+ Ollama Modelfile)
      eval/                       kit eval: the held-out task (JSONL + lm-eval YAML), results and samples
      serve.log, serve-merged.log vLLM's log when kit serve runs it
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import shlex
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Optional

import yaml

from kit.core.errors import AdapterError, ConfigError, RunError
from kit.core.io import atomic_dir, atomic_write_text, disk_full, move_aside, write_json
from kit.models.llama import PROJECTIONS, projection_shapes

if TYPE_CHECKING:
    from kit.config.schema import Config

log = logging.getLogger("kit")
CONFIG, MANIFEST, METRICS = "config.yaml", "manifest.json", "metrics.jsonl"
TENSORBOARD, LOSS_PNG = "tensorboard", "loss.png"
WANDB, MLFLOW_DB, MLFLOW_ARTIFACTS = "wandb", "mlflow.db", "mlflow-artifacts"
EVAL = "eval"
BASE_MODEL, CHECKPOINTS, ADAPTER, EXPORT, MERGED16 = "base-model", "checkpoints", "adapter", "export", "merged16"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
TRAINER_STATE = "trainer_state.json"
COMPLETE = "kit-complete"  # written last into a checkpoint: without it the checkpoint is incomplete
LOCK = ".kit-lock"  # locked by the process that trains in the run directory, and holding its pid
# Unsloth's pre-quantized repos; LoRA applies to the 16-bit model they were made from
BNB_4BIT_SUFFIXES = ("-unsloth-bnb-4bit", "-bnb-4bit")


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def manifest(self) -> Path:
        return self.path / MANIFEST

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def mlflow_db(self) -> Path:
        return self.path / MLFLOW_DB

    @property
    def mlflow_artifacts(self) -> Path:
        return self.path / MLFLOW_ARTIFACTS

    @property
    def eval(self) -> Path:
        return self.path / EVAL

    @property
    def loss_png(self) -> Path:
        return self.path / LOSS_PNG

    @property
    def base_model(self) -> Path:
        return self.path / BASE_MODEL

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER

    @property
    def merged16(self) -> Path:
        return self.path / EXPORT / MERGED16

    def gguf(self, quant: str) -> Path:
        return self.path / EXPORT / f"gguf-{quant}"

    def gguf_files(self) -> list[Path]:
        return sorted((self.path / EXPORT).glob("gguf-*/*.gguf"))

    @property
    def serve_log(self) -> Path:
        return self.path / "serve.log"

    @property
    def serve_merged_log(self) -> Path:
        """Beside the export, never inside it: the export folder is copied and uploaded as a model."""
        return self.path / "serve-merged.log"

    def trained_length(self) -> Optional[int]:
        """The run's model.max_seq_length from its config.yaml (None for a bare adapter folder)."""
        if not self.config.is_file():
            return None
        return (yaml.safe_load(self.config.read_text()) or {}).get("model", {}).get("max_seq_length")


# ---------------------------------------------------------------- lifecycle

def start(cfg: Config) -> Optional[Path]:
    """Check the run directory before anything loads, create it and claim it for this process; on resume, find
    the checkpoint and check it (complete, readable, trained with this config's LoRA). Nothing of an earlier run
    changes here: its record changes only when the resumed training starts (begin)."""
    run, resume = RunDir(cfg.run_dir), cfg.train.resume_from_checkpoint
    if resume is None:
        _make(run.path, cfg)
        if not _unstarted(run):
            if not cfg.run.overwrite:
                raise ConfigError(f"run directory {run.path} already exists. Resume it with "
                                  "train.resume_from_checkpoint=auto, choose another run.name=..., or pass "
                                  "run.overwrite=true (the old run is moved aside, not deleted).")
            log.warning(f"run.overwrite: moved the previous run to {move_aside(run.path)}")
            _owned.pop(run.path.resolve()).close()  # its lock went aside with it
            _make(run.path, cfg)
        _check_checkpoints(run)
        return None
    if resume == "auto":
        if _is_dir(run.path):
            _make(run.path, cfg)  # claimed and checked before an unfinished checkpoint is moved aside
            _check_checkpoints(run)
        found = complete_checkpoints(run.checkpoints) if _is_dir(run.path) else []
        if not found:
            raise ConfigError(f"train.resume_from_checkpoint=auto: {run.checkpoints} holds no complete "
                              "checkpoint to resume from. Start a new run without resume_from_checkpoint.")
        checkpoint = found[-1]
    else:
        checkpoint = Path(resume)
        if not (checkpoint / TRAINER_STATE).is_file():
            raise ConfigError(f"train.resume_from_checkpoint={resume}: not a checkpoint folder (no {TRAINER_STATE}).")
        _make(run.path, cfg)
        _check_checkpoints(run)
    check_checkpoint(checkpoint, cfg)
    log.info(f"resuming from {checkpoint} (step {checkpoint_step(checkpoint)})")
    return checkpoint


_owned: dict[Path, IO[str]] = {}  # the run directories this process claimed: their locks, open until it ends


def claim(run: RunDir) -> None:
    """Make this process the one that trains in `run` until it ends: an exclusive flock on its lock file, which
    the kernel drops when the process ends, however it ends, so no crash leaves the directory stuck (and an exec,
    as --devices N into torchrun, hands it on to the rank 0 that claims it again). ConfigError naming the other
    process when one holds it."""
    if run.path.resolve() in _owned:
        return
    lock = open(run.path / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 - held open: the lock lasts as long
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid = lock.read().strip()
        lock.close()
        other = f"process {pid}" if pid.isdigit() else "another process"
        stop = f"stop it (kill {pid})" if pid.isdigit() else "stop it"
        raise ConfigError(f"run directory {run.path} is in use: {other} is training in it, and two processes in one "
                          f"run would write over each other's checkpoints and metrics. Wait for it to end (or {stop}) "
                          "and run again, or choose another run.name=... to train beside it.") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    _owned[run.path.resolve()] = lock
    atexit.register(_release, run)


def _release(run: RunDir) -> None:
    """At exit, a run that never began training (a refusal, a failed load) keeps nothing of this process: its lock
    file goes (still held while it goes, so no other process can have claimed it)."""
    if not run.manifest.exists():
        (run.path / LOCK).unlink(missing_ok=True)


# what a run may hold before its training starts (a random base, the trackers' records, an empty checkpoint
# folder): a directory with nothing else was left by an attempt that failed before training and is used again
BEFORE_TRAINING = {LOCK, BASE_MODEL, TENSORBOARD, WANDB, MLFLOW_DB, MLFLOW_ARTIFACTS, CHECKPOINTS}


def _unstarted(run: RunDir) -> bool:
    return all(p.name in BEFORE_TRAINING for p in run.path.iterdir()) and not _complete(run.checkpoints)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a path too long for the file system names nothing there
        return False


def _make(path: Path, cfg: Config) -> None:
    """The run directory, created, writable and claimed by this process; else ConfigError naming the setting to
    change."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".kit-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            problem = "the path is too long for this file system"
        elif blocker := next((p for p in (path, *path.parents) if p.is_file()), None):
            problem = f"{blocker} is a file, not a folder"
        else:
            problem = f"cannot write in {next(p for p in (path, *path.parents) if p.exists())} ({e.strerror})"
        raise ConfigError(f"run.output_dir={cfg.run.output_dir}, run.name={cfg.run.name}: {problem}. Choose a "
                          "run.output_dir where you can write (and a shorter run.name if it is long).") from None
    claim(RunDir(path))


def _check_checkpoints(run: RunDir) -> None:
    """Checkpoints are saved, marked complete and rotated (renamed, deleted) while training: a folder there that
    cannot be written is found now, not at the first save."""
    folders = [run.checkpoints, *_checkpoints(run.checkpoints)]
    if locked := [str(d) for d in folders if d.is_dir() and not os.access(d, os.W_OK | os.X_OK)]:
        raise ConfigError(f"{', '.join(locked)}: cannot be written, and training saves and rotates its checkpoints "
                          f"there. Make it writable (chmod -R u+w {shlex.quote(str(run.checkpoints))}), or choose "
                          "another run.name=... for a new run.")


def check_checkpoint(checkpoint: Path, cfg: Config) -> None:
    """A checkpoint to resume from must be readable and trained with this config's LoRA settings; the Trainer
    would fail on it only after the run's record was rewritten, or silently train other settings on."""
    fix = (f"Resume from an earlier checkpoint (train.resume_from_checkpoint=PATH), or move {checkpoint.name} "
           "aside and resume again.")
    try:
        step = json.loads((checkpoint / TRAINER_STATE).read_text())["global_step"]
        if not isinstance(step, int):
            raise TypeError("global_step")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{checkpoint / TRAINER_STATE}: cannot be read ({type(e).__name__}: {e}); the "
                          f"checkpoint is damaged. {fix}") from None
    adapter = read_adapter(checkpoint, damaged=fix)
    for f in sorted(checkpoint.iterdir()):
        if f.suffix in (".pt", ".pth", ".bin"):  # torch.save's zip files: optimizer, scheduler, RNG, arguments
            try:
                with zipfile.ZipFile(f) as z:
                    bad = z.testzip()
            except (zipfile.BadZipFile, OSError) as e:
                bad = str(e)
            if bad:
                raise ConfigError(f"{f}: damaged ({bad}). {fix}")
    c = adapter.config
    saved = {"r": c.get("r"), "alpha": c.get("lora_alpha"), "target_modules": sorted(_names(c.get("target_modules"))),
             "use_rslora": bool(c.get("use_rslora")), "use_dora": bool(c.get("use_dora"))}
    wanted = {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "target_modules": sorted(cfg.target_modules),
              "use_rslora": cfg.lora.use_rslora, "use_dora": cfg.lora.use_dora}
    if differ := [f"lora.{k}={wanted[k]} but the checkpoint has {saved[k]}" for k in saved if saved[k] != wanted[k]]:
        raise ConfigError(f"train.resume_from_checkpoint: {checkpoint} was trained with other LoRA settings: "
                          f"{'; '.join(differ)}. Resume with the run's own settings (its {CONFIG}), or start a new "
                          "run with these.")


def _names(modules) -> list[str]:
    return [modules] if isinstance(modules, str) else list(modules or [])


def check_unfinished(checkpoint: Path, total_steps: int) -> None:
    """Resuming a run from the last step of its plan would train past its end."""
    step = checkpoint_step(checkpoint)
    if step >= total_steps:
        raise ConfigError(f"the run is finished: {checkpoint.name} is step {step} of the {total_steps} this "
                          "configuration plans, so there is nothing to resume. To train longer, raise train.max_steps "
                          "(or train.num_train_epochs) and resume again; to start over, choose another run.name.")


def checkpoint_devices(checkpoint: Path) -> Optional[int]:
    """How many training processes wrote a checkpoint: the Trainer saves each one's RNG state, rng_state.pth for
    one process, rng_state_<rank>.pth for each of several (None: it saved none)."""
    if (checkpoint / "rng_state.pth").is_file():
        return 1
    return len(list(checkpoint.glob("rng_state_*.pth"))) or None


def check_devices(checkpoint: Path, devices: int) -> None:
    """A checkpoint resumes on as many processes as wrote it: its step counts optimizer steps of that many
    devices' batches, so on another count the Trainer would skip the wrong examples and the plan would not hold."""
    wrote = checkpoint_devices(checkpoint)
    if wrote is not None and wrote != devices:
        raise ConfigError(f"train.resume_from_checkpoint: {checkpoint} was written by {wrote} training process(es) "
                          f"and this run has {devices}. Resume it with {wrote} (kit train --devices {wrote} ...), "
                          "or start a new run (another run.name) to train on another number of GPUs.")


def begin(run: RunDir, config_yaml: str, manifest: dict, checkpoint: Optional[Path]) -> None:
    """The run's record, written when its training starts (the Trainer has loaded the model and, on resume, the
    checkpoint): the metrics logged after the checkpoint are dropped (those steps are trained again), then
    config.yaml and manifest.json are written."""
    if checkpoint is not None:
        trim_metrics(run.metrics, checkpoint_step(checkpoint))
    atomic_write_text(run.config, config_yaml)
    write_json(run.manifest, manifest)


def interrupted(run: RunDir, command: list[str]) -> int:
    """Ctrl-C while a run trains: manifest.json says interrupted, and one line says the last step logged, the last
    complete checkpoint and the command that goes on from it (`command`: the one that was stopped). Changes
    nothing else (an unfinished checkpoint is set aside by the resume). 130: a shell's status after Ctrl-C."""
    step, where = _stopped(run, "interrupted", command)
    print(f"interrupted (Ctrl-C) in {run.path} after step {step}; {where}", file=sys.stderr)
    return 130


def failed(run: RunDir, error: Exception, command: list[str]) -> Optional[RunError]:
    """A full disk or a folder made unwritable while the run trained or saved: manifest.json says failed, and the
    error says what the system refused, the last complete checkpoint and the command that goes on from it. None
    for any other error, or before training began (the error is then the library's own)."""
    if not (isinstance(error, OSError) or disk_full(error)) or not _training(run):
        return None
    step, where = _stopped(run, "failed", command)
    what = "the disk is full" if disk_full(error) else str(error)
    return RunError(f"training in {run.path} stopped after step {step}: {what}. Free space or fix the folder's "
                    f"permissions; {where}")


def _stopped(run: RunDir, status: str, command: list[str]) -> tuple[int, str]:
    """Mark a run that was training as `status`; the last step logged, and where and how to go on."""
    started = _training(run)
    if started:
        write_json(run.manifest, {**read_manifest(run), "status": status})
    again = [a for a in command if not a.startswith(("train.resume_from_checkpoint=", "run.overwrite="))]
    found = _complete(run.checkpoints) if _is_dir(run.checkpoints) else []
    if found:
        where = (f"last complete checkpoint: {found[-1]}; go on from it with: "
                 f"{shlex.join([*again, 'train.resume_from_checkpoint=auto'])}")
    elif started:
        where = f"no complete checkpoint yet; start again with: {shlex.join([*again, 'run.overwrite=true'])}"
    else:
        where = f"training had not started; start it with: {shlex.join(again)}"
    return max((m["step"] for m in read_metrics(run.metrics)), default=0), where


def _training(run: RunDir) -> bool:
    return run.manifest.is_file() and read_manifest(run).get("status") == "training"


def read_manifest(run: RunDir) -> dict:
    return json.loads(run.manifest.read_text(encoding="utf-8"))


def record_evaluation(run: RunDir, source: str, summary: dict) -> None:
    """kit eval's summary into manifest.json's "evaluation", under what was evaluated (adapter, merged16)."""
    manifest = read_manifest(run)
    manifest.setdefault("evaluation", {})[source] = summary
    write_json(run.manifest, manifest)


def _metrics_line(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def append_metrics(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(_metrics_line(row))


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def read_growing_metrics(path: Path) -> tuple[list[dict], Optional[str]]:
    """metrics.jsonl of a run that may still be writing it (kit studio), and what is wrong with it if anything: a
    last line still being written is left for the next read; a damaged line is left out and named."""
    if not Path(path).is_file():
        return [], None
    lines = Path(path).read_text(encoding="utf-8", errors="replace").split("\n")
    rows, problem = [], None
    for n, line in enumerate(lines[:-1], 1):  # the text after the last newline is not complete yet
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            problem = problem or f"{path}, line {n}: not JSON ({e.msg}); that line is left out"
    return rows, problem


def trim_metrics(path: Path, upto_step: int) -> None:
    if path.exists():
        keep = [m for m in read_metrics(path) if m["step"] <= upto_step]
        atomic_write_text(path, "".join(_metrics_line(m) for m in keep))


# ---------------------------------------------------------------- checkpoints

def checkpoint_name(step: int) -> str:
    """The Trainer's name for the checkpoint of `step`."""
    return f"checkpoint-{step}"


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def _checkpoints(folder: Path) -> list[Path]:
    return sorted((d for d in Path(folder).glob(checkpoint_name("*")) if d.name.split("-")[-1].isdigit()),
                  key=checkpoint_step)


def _complete(folder: Path) -> list[Path]:
    return [d for d in _checkpoints(folder) if (d / COMPLETE).exists()]


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first; incomplete ones (a crash mid-save) are renamed aside."""
    for d in _checkpoints(folder):
        if not (d / COMPLETE).exists():
            aside = d.parent / f".incomplete-{d.name}"
            log.warning(f"{d} was not completely written (interrupted save); moved to {aside.name}.")
            os.replace(d, aside)
    return _complete(folder)


def rotate_checkpoints(folder: Path, keep: Optional[int], best: Optional[str] = None) -> None:
    """Keep the newest `keep` complete checkpoints (and `best`, which early stopping loads at the end); older
    complete ones go. Run after a checkpoint is marked complete, so the one a run resumed from stays until a
    newer one is complete; incomplete ones are never touched. A deleted checkpoint is first renamed, so that a
    crash while deleting leaves no half-deleted folder that looks complete."""
    if keep is None:
        return
    for stale in Path(folder).glob(".deleted-*"):
        shutil.rmtree(stale, ignore_errors=True)
    complete = _complete(folder)
    for d in complete[:-keep]:
        if best is None or d.name != Path(best).name:
            gone = d.parent / f".deleted-{d.name}"
            os.replace(d, gone)
            shutil.rmtree(gone, ignore_errors=True)


def tokens_seen(checkpoint: Optional[Path]) -> int:
    """Tokens a checkpoint had trained (0 for a fresh start)."""
    if checkpoint is None:
        return 0
    return json.loads((checkpoint / TRAINER_STATE).read_text()).get("num_input_tokens_seen", 0)


# ---------------------------------------------------------------- the adapter

def sixteen_bit(base: str) -> str:
    for suffix in BNB_4BIT_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


@dataclass(frozen=True)
class Adapter:
    path: Path
    """The folder holding adapter_config.json and adapter_model.safetensors."""
    config: dict
    """adapter_config.json."""
    shapes: dict[str, tuple[int, ...]]
    """Tensor name -> shape, from the safetensors header."""

    @property
    def named_base(self) -> str:
        return self.config["base_model_name_or_path"]

    @property
    def base(self) -> str:
        """The 16-bit model the adapter applies to: a QLoRA adapter is merged into (and served on) the
        original weights, never a de-quantized 4-bit copy."""
        return sixteen_bit(self.named_base)

    @property
    def note(self) -> Optional[str]:
        if self.base == self.named_base:
            return None
        return (f"the adapter names the 4-bit repo {self.named_base}; using the 16-bit base {self.base} "
                "(LoRA applies to unquantized weights; the 4-bit copy would only lose quality)")

    @property
    def rank(self) -> int:
        return max([self.config["r"], *self.config.get("rank_pattern", {}).values()])

    def check_fits(self, base_config: dict, base: str) -> None:
        """The LoRA matrices must fit the base: hidden size, layers, projection widths."""
        hidden, layers = base_config["hidden_size"], base_config["num_hidden_layers"]
        widths = projection_shapes(base_config)
        for key, shape in self.shapes.items():
            parts = key.split(".")
            module = next((p for p in parts if p in PROJECTIONS), None)
            if "layers" not in parts or module is None or not {"lora_A", "lora_B"} & set(parts):
                continue
            layer = int(parts[parts.index("layers") + 1])
            fan_in, fan_out = widths[module]
            expected = (shape[0], fan_in) if "lora_A" in parts else (fan_out, shape[1])
            if layer >= layers or shape != expected:
                raise AdapterError(
                    f"{self.path}: {key} has shape {shape}, but the base {base} ({layers} layers, hidden {hidden}) "
                    f"needs {expected if layer < layers else 'fewer layers'}. This adapter was trained for a "
                    "different model, of another shape: use it with the base it was trained on.")


def read_adapter(path: Path, damaged: Optional[str] = None) -> Adapter:
    """The adapter of a run directory (RUN/adapter), a bare adapter folder or a checkpoint; AdapterError when it
    is missing or damaged. `damaged`: the fix to name for a missing or damaged one, where it is not the run's."""
    path = Path(path)
    folder = path / ADAPTER if (path / ADAPTER).is_dir() else path
    cfg_file, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not cfg_file.is_file():
        raise AdapterError(f"{path}: no adapter ({ADAPTER}/{ADAPTER_CONFIG}). " + (damaged or (
            "Train the run first (python -m kit.recipes.llama31_sft) or check the path; to serve a merged export "
            "instead, pass kit serve --merged.")))
    if not weights.is_file():
        raise AdapterError(f"{folder}: {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; the save was interrupted. "
                           + (damaged or "Resume the run (train.resume_from_checkpoint=auto) to write it again."))
    resave = damaged or "The adapter is damaged: re-save it from a checkpoint."
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_file}: not valid JSON ({e}). {resave}") from None
    if problem := _config_problem(config):
        raise AdapterError(f"{cfg_file}: {problem}: not a LoRA adapter's configuration. {resave}")
    return Adapter(folder, config, _tensor_shapes(weights, resave))


def _config_problem(config) -> Optional[str]:
    """What makes an adapter_config.json unusable, if anything: the fields the kit and vLLM read."""
    if not isinstance(config, dict):
        return f"it holds {type(config).__name__}, not an object"
    if not isinstance(config.get("base_model_name_or_path"), str) or not config["base_model_name_or_path"]:
        return "base_model_name_or_path is missing"
    if config.get("peft_type", "LORA") != "LORA":
        return f"peft_type is {config['peft_type']!r}"
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        return f"r is {r!r}, not a rank"
    return None


def _tensor_shapes(weights: Path, fix: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes from a safetensors header, without loading the weights."""
    size = weights.stat().st_size
    try:
        with open(weights, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            tensors = {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}
        end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
        if 8 + n + end > size:
            raise ValueError(f"{size} bytes, but the header describes {8 + n + end}")
        return {k: tuple(v["shape"]) for k, v in tensors.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise AdapterError(f"{weights} cannot be read ({e}); the file is corrupt. {fix}") from None


def save_adapter(model, tokenizer, folder: Path, base: str) -> Path:
    """The trained PEFT adapter and the tokenizer, written atomically, naming `base` as the base model
    (Unsloth may record its own -bnb-4bit repo name there)."""
    with atomic_dir(folder, replace=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        cfg_file = tmp / ADAPTER_CONFIG
        data = json.loads(cfg_file.read_text())
        data["base_model_name_or_path"] = base
        cfg_file.write_text(json.dumps(data, indent=2))
    return folder
