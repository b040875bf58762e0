"""Every environment variable the kit reads, and where this copy of the kit is installed."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

API_KEY_ENV = "KIT_API_KEY"  # the default name; kit serve/chat --api-key-env name another


def hf_token() -> Optional[str]:
    """The Hugging Face token for gated models and datasets (Llama 3.1 is gated)."""
    return os.environ.get("HF_TOKEN") or None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read as huggingface_hub reads it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE")


def hub_endpoint() -> str:
    """HF_ENDPOINT: the Hub's address (a mirror, or a private Hub), as huggingface_hub reads it."""
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def hf_home() -> Path:
    """HF_HOME: the folder of Hugging Face's caches, as huggingface_hub reads it ($XDG_CACHE_HOME/huggingface or
    ~/.cache/huggingface without it)."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(os.path.expanduser(os.environ.get("HF_HOME") or default)))


def debug() -> bool:
    """KIT_DEBUG=1: the commands print the traceback of an error too."""
    return os.environ.get("KIT_DEBUG", "") not in ("", "0")


def api_key(name: str = API_KEY_ENV) -> Optional[str]:
    return os.environ.get(name) or None


def vllm_python() -> Optional[str]:
    """KIT_VLLM_PYTHON: an interpreter that has vLLM, when it is not this one."""
    return os.environ.get("KIT_VLLM_PYTHON") or None


def image_commit() -> Optional[str]:
    """KIT_GIT_COMMIT: the kit's commit recorded by the image build (no checkout inside an image)."""
    return os.environ.get("KIT_GIT_COMMIT") or None


def world_size() -> int:
    """WORLD_SIZE: the training processes of a distributed run, as torchrun (and accelerate launch) set it;
    1 for a process started on its own."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """RANK: this process's place among them (0 writes the run directory)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """LOCAL_RANK: its place on this machine, so the GPU it trains on."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """LOCAL_WORLD_SIZE: the processes on this machine (torchrun sets it; WORLD_SIZE on one machine)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or world_size())


def wandb_mode() -> Optional[str]:
    """WANDB_MODE as the user set it (online, offline, disabled); without it the kit runs wandb offline."""
    return os.environ.get("WANDB_MODE") or None


def wandb_key_set() -> bool:
    """WANDB_API_KEY (or WANDB_IDENTITY_TOKEN_FILE) is set: wandb's credentials from the environment."""
    return bool(os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"))


def wandb_base_url() -> str:
    """WANDB_BASE_URL: the W&B server an online run uploads to."""
    return os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"


def netrc_path() -> Path:
    """NETRC, else ~/.netrc: where `wandb login` keeps the API key."""
    return Path(os.environ.get("NETRC") or "~/.netrc").expanduser()


def mlflow_allows_file_store() -> bool:
    """MLFLOW_ALLOW_FILE_STORE=true: MLflow 3 opens its (deprecated) file store only with it."""
    return os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("true", "1")


def mlflow_tracking_uri() -> Optional[str]:
    """MLFLOW_TRACKING_URI: the user's MLflow server or store, instead of the one in the run directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or None


@contextlib.contextmanager
def setting(values: dict[str, str]) -> Iterator[None]:
    """`values` in the environment while the block runs, for the libraries configured through it (wandb, as
    transformers' integration starts it), then the environment as it was."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def health_port() -> int:
    return int(os.environ.get("KIT_HEALTH_PORT", "8000"))


def checkout() -> Optional[Path]:
    """The source checkout this kit runs from (an editable install), or None for an installed copy."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "kit").is_dir() else None
