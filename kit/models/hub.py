"""The Hugging Face Hub as the kit meets it: is a model there, in the local cache or reachable now?

Answered in seconds and before anything loads, so that no command waits on the Hub client's retries to
learn that there is no network, and every such problem names the setting it came from and the fix.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from kit.core import env
from kit.core.errors import AdapterError, ConfigError

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


def base_config(base: str, setting: str = "the adapter's base_model_name_or_path") -> dict:
    """config.json of a base model: a local folder, or from the Hub (cached); `setting` names where `base`
    was given, for the error when it cannot be read."""
    check_model(base, setting)  # in seconds, where the Hub client would retry for a minute
    local = Path(base).expanduser() / "config.json"
    try:
        if local.parent.is_dir():
            return json.loads(local.read_text())
        from huggingface_hub import hf_hub_download
        return json.loads(Path(hf_hub_download(base, "config.json", token=env.hf_token())).read_text())
    except Exception as e:
        raise AdapterError(f"{setting}='{base}': cannot read the base model's config.json ({type(e).__name__}: "
                           f"{str(e).strip()[:200]}). Give a model folder holding config.json, or a Hub id you can "
                           "download (HF_TOKEN for gated models).") from None
