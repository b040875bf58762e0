"""kit export on bad input: clear errors, nothing half-written. Uses the small adapter fixture, no training."""
import errno
import json
import shutil
import sys

import pytest

from kit.core.errors import AdapterError, SetupError
from kit.export import exporter as ex


def test_run_without_adapter(tmp_path):
    with pytest.raises(AdapterError, match="no adapter"):
        ex.export(tmp_path, "merged16")


def test_corrupt_adapter_file(adapter_run):
    (adapter_run / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterError, match="corrupt"):
        ex.export(adapter_run, "merged16")
    assert not (adapter_run / "export" / "merged16").exists()


def test_adapter_for_a_different_base_shape(adapter_run, tmp_path):
    from kit.models.tiny import llama31_config
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


@pytest.mark.parametrize("to, quant", [("gguf", "f16"), ("merged16", "q8_0")])
def test_not_enough_disk_is_refused_before_writing(adapter_run, tiny_base, monkeypatch, to, quant):
    import numpy as np

    from kit.run.rundir import _tensor_shapes
    # room for the 16-bit weights and 1 MB: not for Llama 3.1's tokenizer files (9 MB) besides
    weights = sum(np.prod(s) for s in _tensor_shapes(tiny_base / "model.safetensors", "").values()) * 2 * 1.05
    asked = []
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: asked.append(p) or shutil._ntuple_diskusage(10**12, 0, int(weights) + 10**6))
    with pytest.raises(ex.ExportError, match=f"not enough disk for {to if to == 'merged16' else quant}"):
        ex.export(adapter_run, to, quant)
    assert asked == [adapter_run], "the run's own disk, measured at its nearest existing folder"
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


def test_disk_filling_up_in_safetensors_is_named_and_leaves_the_earlier_merged16(adapter_run, monkeypatch):
    from safetensors import SafetensorError
    from transformers import modeling_utils
    earlier = adapter_run / "export" / "merged16"
    earlier.mkdir(parents=True)
    (earlier / "config.json").write_text("{}")

    def full(*a, **k):  # safetensors' Rust writer words ENOSPC in its own error, not as an OSError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(modeling_utils, "safe_save_file", full)
    with pytest.raises(ex.ExportError, match=rf"disk filled up while writing {earlier} \(No space left on device\)"):
        ex.export(adapter_run, "merged16")
    assert [p.name for p in (adapter_run / "export").iterdir()] == ["merged16"]
    assert [p.name for p in earlier.iterdir()] == ["config.json"], "the earlier export is untouched"


def test_cli_reports_a_missing_run_without_a_traceback(tmp_path):
    import subprocess
    import sys
    for command in (["export", "--to", "merged16"], ["verify"], ["ask", "--prompt", "안녕"]):
        out = subprocess.run([sys.executable, "-m", "kit.cli", command[0], str(tmp_path / "missing"), *command[1:]],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and "no adapter" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_k_quant_without_llama_cpp_names_the_make_target_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as after `make demo`, which leaves llama.cpp out
    with pytest.raises(SetupError, match=r"--quant q4_k_m \(llama.cpp's quantizer\) needs llama-cpp-python, which "
                                         r"is not installed: run `make setup-extras`"):
        ex.export(tmp_path / "no-run", "gguf", "q4_k_m")  # no adapter either: that would be reported later


def test_a_recipe_exporting_a_k_quant_without_llama_cpp_stops_before_the_run_starts(tmp_path, monkeypatch):
    from kit.config.load import load_config
    from kit.recipes.steps import start_run
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    cfg = load_config("demo", [f"run.output_dir={tmp_path}", "export.formats=[gguf]", "export.gguf_quant=q4_k_m"])
    with pytest.raises(SetupError, match=r"export.gguf_quant=q4_k_m needs llama-cpp-python.*make setup-extras"):
        start_run(cfg, devices=1)
    assert not any(tmp_path.iterdir())  # no run directory
