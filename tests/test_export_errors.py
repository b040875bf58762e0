"""kit export on bad input: clear errors, nothing half-written. Uses the small adapter fixture, no training."""
import errno
import json
import shutil

import pytest

from kit import export as ex
from kit.rundir import AdapterError


def test_run_without_adapter(tmp_path):
    with pytest.raises(AdapterError, match="no adapter"):
        ex.export(tmp_path, "merged16")


def test_corrupt_adapter_file(adapter_run):
    (adapter_run / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterError, match="corrupt"):
        ex.export(adapter_run, "merged16")
    assert not (adapter_run / "export" / "merged16").exists()


def test_adapter_for_a_different_base_shape(adapter_run, tmp_path):
    from kit.tiny import llama31_config
    from tests.helpers import edit_adapter_config
    cfg = llama31_config("tiny").to_dict()
    cfg["hidden_size"], cfg["intermediate_size"] = 512, 1024
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps(cfg))
    edit_adapter_config(adapter_run, base_model_name_or_path=str(tmp_path / "other"))
    with pytest.raises(AdapterError, match="another shape"):
        ex.export(adapter_run, "merged16")


def test_unknown_quant(adapter_run):
    with pytest.raises(ex.ExportError, match="unknown GGUF type"):
        ex.export(adapter_run, "gguf", "q3_x")


def test_not_enough_disk_is_refused_before_writing(adapter_run, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ex.ExportError, match="not enough disk"):
        ex.export(adapter_run, "gguf", "f16")
    assert not (adapter_run / "export").exists() or not any((adapter_run / "export").iterdir())


def test_disk_filling_up_mid_write_leaves_no_partial_export(adapter_run, monkeypatch):
    import gguf

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    with pytest.raises(ex.ExportError, match="disk filled up"):
        ex.export(adapter_run, "gguf", "f16")
    leftovers = list((adapter_run / "export").iterdir()) if (adapter_run / "export").exists() else []
    assert leftovers == [], leftovers


def test_cli_reports_a_missing_run_without_a_traceback(tmp_path):
    import subprocess
    import sys
    for command in (["export", "--to", "merged16"], ["verify"], ["ask", "--prompt", "안녕"]):
        out = subprocess.run([sys.executable, "-m", "kit.cli", command[0], str(tmp_path / "missing"), *command[1:]],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and "no adapter" in out.stderr and "Traceback" not in out.stderr, out.stderr
