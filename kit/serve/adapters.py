"""`kit adapters`: load a run's adapter into a running vLLM server, or unload one, through vLLM's runtime
LoRA endpoints (/v1/load_lora_adapter, /v1/unload_lora_adapter), which a server has only when it was
started with `kit serve ... --allow-runtime-adapters`. The kit's preflight checks the adapter against the
served base first. vLLM reads the adapter from the path it is given: the server must run on this machine
and its process must be able to read the run directory.

    kit adapters load http://127.0.0.1:8000/v1 runs/b [--name b]
    kit adapters unload http://127.0.0.1:8000/v1 b
"""
from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from kit.core import env
from kit.core.errors import ServerError
from kit.models.hub import base_config
from kit.run.rundir import RunDir, read_adapter
from kit.serve.preflight import check_servable, lora_rank

RUNTIME_HINT = ("restart it with runtime adapters: kit serve RUN_DIR ... --allow-runtime-adapters (which sets "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True for vLLM)")


@dataclass(frozen=True)
class Api:
    url: str
    """The server's /v1 base URL."""
    key: Optional[str]
    key_env: str = env.API_KEY_ENV

    def call(self, path: str, payload: Optional[dict] = None) -> tuple[int, str]:
        """(HTTP status, body) of GET (or, with a payload, POST) url + path; ServerError when nothing answers
        or the server wants another API key."""
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = None if payload is None else json.dumps(payload).encode()
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url + path, data, headers), timeout=600) as r:
                status, body = r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read().decode(errors="replace")
        except (urllib.error.URLError, OSError) as e:
            raise ServerError(f"no server answers at {self.url} ({getattr(e, 'reason', e)}); start one with: "
                              "kit serve RUN_DIR --allow-runtime-adapters") from None
        if status == 401:
            raise ServerError(f"{self.url} wants an API key: put the server's key in the environment variable "
                              f"{self.key_env} (or name another with --api-key-env).")
        return status, body

    def models(self) -> list[dict]:
        """/v1/models: the base (its `parent` is null) and each adapter (its `parent` is the base)."""
        status, body = self.call("/models")
        if status != 200:
            raise ServerError(f"{self.url}/models answered {status}: {body[:300]}")
        return json.loads(body)["data"]

    def base(self) -> dict:
        base = next((m for m in self.models() if m.get("parent") is None), None)
        if base is None:
            raise ServerError(f"{self.url}/models lists no base model: is this a vLLM server (kit serve)?")
        return base


def v1(url: str) -> str:
    """The /v1 base URL, given it with or without /v1 (as kit chat and kit verify take it)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ServerError(f"'{url}' is not a server's URL: give its http:// or https:// address, e.g. "
                          "http://127.0.0.1:8000/v1 (kit serve prints it).")
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _vllm_message(body: str) -> tuple[Optional[str], str]:
    """(vLLM's error type, its message) from an error body; (None, body) for a route that does not exist."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None, body.strip()[:300]
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return error.get("type"), error.get("message", "")
    return None, str(data.get("detail", body) if isinstance(data, dict) else body)[:300]


def load(api: Api, run_dir: Path, name: Optional[str] = None) -> str:
    """Load the run's adapter into the server as `name` (default: the run's folder name); returns the name."""
    adapter = read_adapter(run_dir)
    check_servable(adapter, run_dir)
    rank = lora_rank(adapter.rank)
    base = api.base()
    adapter.check_fits(base_config(base["root"]), base["id"])
    if adapter.base != base["root"]:
        print(f"note: {adapter.path} names the base {adapter.base}; the server serves {base['root']}, of the same "
              "shape. Check its answers: kit verify RUN_DIR --url URL --model NAME.", file=sys.stderr)
    check_template(api, base["id"], adapter.path)
    name = name or RunDir(Path(run_dir)).name
    path = str(adapter.path.resolve())
    status, body = api.call("/load_lora_adapter", {"lora_name": name, "lora_path": path})
    if status == 200:
        return name
    kind, message = _vllm_message(body)
    if status == 404 and kind is None:  # the route is missing: vLLM adds it only with runtime updating on
        raise ServerError(f"{api.url} does not accept runtime adapters (it has no /v1/load_lora_adapter): it was "
                          f"started without them; {RUNTIME_HINT}. Or serve this run with the others from the start: "
                          f"kit serve RUN_DIR {run_dir}.")
    if status == 404:
        raise ServerError(f"the server cannot read {path} ({message}): vLLM loads the adapter from that path itself, "
                          "so the server must run on this machine and its process must be able to read the run "
                          "directory.")
    if "max_lora_rank" in message:
        raise ServerError(f"vLLM refused {name}: {message} The server's --max-lora-rank is fixed when it starts: "
                          f"restart kit serve with --max-lora-rank {rank} (or more).")
    if status == 400:
        raise ServerError(f"vLLM refused {name}: {message} Unload it first (kit adapters unload {api.url} {name}) "
                          "or load it under another --name.")
    raise ServerError(f"vLLM refused {name} ({status} {kind}): {message} The server's log (serve.log in the "
                      "served run directory) has the details.")


def check_template(api: Api, model: str, folder: Path) -> None:
    """The server renders every request with its tokenizer's chat template, whichever adapter it names (vLLM has
    one tokenizer): the adapter's own template (saved beside it) must render a prompt to the same ids. Checked
    through the server's /tokenize (vLLM's); a server without it, or an adapter folder without a tokenizer, is
    not checked."""
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(folder))
    if not tok.chat_template:
        return
    messages = [{"role": "user", "content": "Hello"}]
    local = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    status, body = Api(api.url.removesuffix("/v1"), api.key, api.key_env).call(
        "/tokenize", {"model": model, "messages": messages, "add_generation_prompt": True})
    try:
        served = json.loads(body)["tokens"] if status == 200 else None
    except (json.JSONDecodeError, KeyError, TypeError):
        served = None
    if served is not None and served != local:
        raise ServerError(f"{folder} was trained with another chat template than the server renders every request "
                          f"with (its tokenizer's): a prompt becomes other ids there ({served[:8]}) than in training "
                          f"({local[:8]}), so its answers would not be the trained ones. Serve it on a server of its "
                          "own: kit serve RUN_DIR.")


def unload(api: Api, name: str) -> None:
    status, body = api.call("/unload_lora_adapter", {"lora_name": name})
    if status == 200:
        return
    kind, message = _vllm_message(body)
    if status == 404 and kind is None:
        raise ServerError(f"{api.url} does not accept runtime adapters (it has no /v1/unload_lora_adapter): it was "
                          f"started without them; {RUNTIME_HINT}.")
    if status == 404:
        loaded = [m["id"] for m in api.models() if m.get("parent") is not None]
        raise ServerError(f"{api.url} serves no adapter named {name}; its adapters: {', '.join(loaded) or 'none'}.")
    raise ServerError(f"vLLM refused to unload {name} ({status} {kind}): {message}")


# ---------------------------------------------------------------- command line

def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    ld = sub.add_parser("load", help="load a run's adapter into a server started with --allow-runtime-adapters")
    ld.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000/v1")
    ld.add_argument("run_dir", type=Path, help="the run directory (or adapter folder) to load")
    ld.add_argument("--name", help="served adapter name (default: the run's folder name)")
    un = sub.add_parser("unload", help="unload an adapter from a server started with --allow-runtime-adapters")
    un.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000/v1")
    un.add_argument("name", help="the served adapter name")
    for q in (ld, un):
        q.add_argument("--api-key-env", default=env.API_KEY_ENV, help="environment variable holding the API key")


def run_cli(args) -> int:
    api = Api(v1(args.url), env.api_key(args.api_key_env), args.api_key_env)
    if args.action == "load":
        name = load(api, args.run_dir, args.name)
        print(f"loaded {name} from {args.run_dir}; ask it: kit chat --url {api.url} --model {name}")
    else:
        unload(api, args.name)
        print(f"unloaded {args.name} from {api.url}")
    return 0
