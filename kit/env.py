"""Every environment variable the kit reads, and where this copy of the kit is installed."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

API_KEY_ENV = "KIT_API_KEY"  # the default name; kit serve/chat --api-key-env name another


def hf_token() -> Optional[str]:
    """The Hugging Face token for gated models and datasets (Llama 3.1 is gated)."""
    return os.environ.get("HF_TOKEN") or None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1"


def api_key(name: str = API_KEY_ENV) -> Optional[str]:
    return os.environ.get(name) or None


def vllm_python() -> Optional[str]:
    """KIT_VLLM_PYTHON: an interpreter that has vLLM, when it is not this one."""
    return os.environ.get("KIT_VLLM_PYTHON") or None


def image_commit() -> Optional[str]:
    """KIT_GIT_COMMIT: the kit's commit recorded by the image build (no checkout inside an image)."""
    return os.environ.get("KIT_GIT_COMMIT") or None


def health_port() -> int:
    return int(os.environ.get("KIT_HEALTH_PORT", "8000"))


def checkout() -> Optional[Path]:
    """The source checkout this kit runs from (an editable install), or None for an installed copy."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "kit").is_dir() else None
