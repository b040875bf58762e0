"""The Hugging Face Hub as the kit meets it: is a model there, in the local cache or reachable now?

Answered in seconds and before anything loads, so that no command waits on the Hub client's retries to
learn that there is no network, and every such problem names the setting it came from and the fix.
"""
from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Optional
from urllib.parse import urlsplit

from kit import env
from kit.errors import ConfigError
from kit.gguf_source import is_gguf_source

if TYPE_CHECKING:
    from kit.config import Config

log = logging.getLogger("kit")
PROBE_SECONDS = 3.0


def unreachable_reason() -> Optional[str]:
    """Why the Hub cannot be reached from here (None: it can): HF_HUB_OFFLINE, or no TCP connection to
    HF_ENDPOINT within PROBE_SECONDS."""
    if env.hub_offline():
        return "HF_HUB_OFFLINE=1 is set"
    url = urlsplit(env.hub_endpoint())
    address = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    outcome: dict[str, str] = {}

    def probe():
        try:
            socket.create_connection(address, timeout=PROBE_SECONDS).close()
            outcome["ok"] = ""
        except OSError as e:
            outcome["error"] = e.strerror or str(e) or type(e).__name__

    thread = threading.Thread(target=probe, daemon=True)  # a thread: name resolution has no timeout of its own
    thread.start()
    thread.join(PROBE_SECONDS + 0.5)
    if "ok" in outcome:
        return None
    return f"no connection to {address[0]}:{address[1]} ({outcome.get('error', f'no answer in {PROBE_SECONDS:g} s')})"


def cached(repo_id: str, revision: Optional[str] = None, filename: str = "config.json") -> bool:
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)


def check_model(name: str, setting: str, revision: Optional[str] = None) -> None:
    """A model given as `setting` (model.name, model.tokenizer, an adapter's base) must be a local folder,
    a Hub id in the local cache, or a Hub id the Hub can be asked for now; otherwise ConfigError."""
    path = Path(name).expanduser()
    if path.is_dir():
        return
    if path.exists() or name.startswith((".", "/", "~")):
        raise ConfigError(f"{setting}='{name}': no such model folder. Give a folder holding config.json and the "
                          "weights, or a Hub id like meta-llama/Llama-3.1-8B-Instruct.")
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ConfigError(f"{setting}='{name}' is neither a local model folder nor a Hugging Face Hub id "
                          "(owner/name).") from None
    reason = unreachable_reason()
    if reason is None:
        return
    if cached(name, revision):
        if not env.hub_offline():
            log.warning(f"the Hub cannot be reached ({reason}); {name} comes from the local cache. Set "
                        "HF_HUB_OFFLINE=1 to skip the Hub client's retries.")
        return
    raise ConfigError(f"{setting}='{name}': not in the local Hugging Face cache, and the Hub cannot be reached "
                      f"({reason}). Download it where there is network (huggingface-cli download {name}; gated "
                      "models such as Llama 3.1 need their license accepted on the Hub and HF_TOKEN set), or "
                      f"point {setting} at a local model folder.")


def check_models(cfg: Config) -> None:
    """The models a recipe loads: model.name (not for a random-weight model or a GGUF file, which
    kit.gguf_source checks) and model.tokenizer."""
    if cfg.model.random_shape is None and not is_gguf_source(cfg.model.name):
        check_model(cfg.model.name, "model.name", cfg.model.revision)
    if cfg.model.tokenizer:
        check_model(cfg.model.tokenizer, "model.tokenizer", cfg.model.revision)
