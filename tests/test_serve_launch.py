"""kit serve's launcher with a stand-in for vLLM (KIT_VLLM_PYTHON): what users see when vLLM fails."""
import os
import stat

import pytest

from kit.serve import launcher
from kit.serve.preflight import ServeSpec


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    def make(body: str):
        exe = tmp_path / "fake-python"
        exe.write_text("#!/bin/sh\n" + body + "\n")
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
        monkeypatch.setenv("KIT_VLLM_PYTHON", str(exe))
        return ServeSpec(base=str(tmp_path), tokenizer=str(tmp_path))
    return make


def test_a_server_that_dies_is_reported_with_its_log(fake_vllm, tmp_path):
    plan = fake_vllm('echo "ValueError: not enough KV cache memory"; exit 3')
    with pytest.raises(RuntimeError, match="exited with code 3") as e:
        launcher.start(plan, port=1, log=tmp_path / "serve.log", timeout=30)
    assert "not enough KV cache memory" in str(e.value)


def test_a_server_that_never_gets_healthy_is_stopped(fake_vllm, tmp_path):
    plan = fake_vllm('echo "$$" > "$(dirname "$0")/pid"; echo "compiling..."; exec sleep 600')
    with pytest.raises(RuntimeError, match="not healthy after 2 s; stopped it") as e:
        launcher.start(plan, port=1, log=tmp_path / "serve.log", timeout=2)
    assert "compiling..." in str(e.value)
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):  # stopped and reaped
        os.kill(pid, 0)
