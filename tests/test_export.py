"""Exports of the demo's trained tiny model, checked against base + adapter; llama.cpp is the real one."""
import errno
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import train_rows
from kit import export as ex
from kit.data import to_messages
from kit.infer import load_adapter_model
from kit.verify import gguf_run, hf_run, prompt_ids

pytestmark = pytest.mark.slow
EOT = 128009


@pytest.fixture(scope="module")
def exported(demo_run):
    run_dir = demo_run[0]
    for to, quant in [("merged16", None), ("gguf", "f16"), ("gguf", "bf16"), ("gguf", "q8_0"), ("gguf", "q4_k_m")]:
        ex.export(run_dir, to, quant or "q8_0")
    return run_dir


@pytest.fixture(scope="module")
def reference(demo_run):
    return load_adapter_model(demo_run[0])


@pytest.fixture(scope="module")
def prompts(demo_run):
    rows = train_rows(demo_run[0]).select(range(3))
    return [to_messages(r, "alpaca", {}, None, "row")[0]["content"] for r in rows] + \
        ["배치 크기란 무엇인가요?", "What is the capital of France?"]


def _gguf(exported, folder, **kw):
    import llama_cpp
    path = next((exported / "export" / folder).glob("*.gguf"))
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False, **kw)


def _greedy_pairs(llm, reference, prompts):
    """(transformers' greedy tokens, llama.cpp's under the same prefix) for the three trained questions."""
    ref_model, tok = reference
    pairs = []
    for p in prompts[:3]:
        ids = prompt_ids(tok, p)
        cont, _ = hf_run(ref_model, ids, 48)
        pairs.append((cont, gguf_run(llm, ids, 48, ids + cont)[0]))
    return pairs


def test_merged16_is_a_plain_model_with_equal_logits(exported, reference, prompts):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    out = exported / "export" / "merged16"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not hasattr(model, "peft_config") and "lora" not in " ".join(n for n, _ in model.named_parameters())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert GenerationConfig.from_pretrained(out).eos_token_id == [128001, 128008, 128009]
    tok = AutoTokenizer.from_pretrained(out)
    assert "<|start_header_id|>" in tok.chat_template and tok.eos_token == "<|eot_id|>"
    ref_model, ref_tok = reference
    for p in prompts:
        ids = torch.tensor([prompt_ids(ref_tok, p)])
        with torch.no_grad():
            a, b = ref_model(ids).logits, model(ids).logits
        # bf16 rounding of the merged weights: a few hundredths on logits of this size
        assert (a - b).abs().max() < 0.25, p
        assert (a.argmax(-1) == b.argmax(-1)).all()


def test_f16_gguf_in_llama_cpp_matches_transformers_and_stops(exported, reference, prompts):
    ref_model, tok = reference
    llm = _gguf(exported, "gguf-f16", logits_all=True)
    for i, p in enumerate(prompts):
        ids = prompt_ids(tok, p)
        cont, logits = hf_run(ref_model, ids, 48)
        got, lg = gguf_run(llm, ids, 48, ids + cont)
        assert got == cont, p  # the same greedy tokens, the stop token included
        assert float(np.abs(lg - logits).max()) < 0.5
        if i < 3:  # trained questions: the answer ends at <|eot_id|> and llama.cpp stops there too
            assert got[-1] == EOT and len(got) < 48


def test_gguf_carries_llama31_metadata(exported):
    from gguf import GGUFReader
    r = GGUFReader(str(next((exported / "export" / "gguf-f16").glob("*.gguf"))))
    fields = {k: r.fields[k] for k in r.fields}

    def scalar(key):
        f = fields[key]
        return f.parts[f.data[0]].tolist()[0] if f.types[0].name != "STRING" else bytes(f.parts[f.data[0]]).decode()
    assert scalar("general.architecture") == "llama"
    assert scalar("tokenizer.ggml.model") == "gpt2" and scalar("tokenizer.ggml.pre") == "llama-bpe"
    assert scalar("tokenizer.ggml.bos_token_id") == 128000 and scalar("tokenizer.ggml.eos_token_id") == EOT
    assert scalar("tokenizer.ggml.eot_token_id") == EOT
    assert "<|start_header_id|>" in scalar("tokenizer.chat_template")
    assert len(fields["tokenizer.ggml.merges"].data) > 200_000
    names = {t.name for t in r.tensors}
    assert "rope_freqs.weight" in names and "blk.0.attn_q.weight" in names and "output.weight" in names
    modelfile = (exported / "export" / "gguf-f16" / "Modelfile").read_text()
    assert 'PARAMETER stop "<|eot_id|>"' in modelfile and "FROM ./demo-f16.gguf" in modelfile


def test_bf16_gguf_matches_transformers_on_trained_questions(exported, reference, prompts):
    for want, got in _greedy_pairs(_gguf(exported, "gguf-bf16", logits_all=True), reference, prompts):
        assert got == want


def test_q8_0_agrees_on_first_tokens_and_q4_k_m_generates(exported, reference, prompts):
    for want, got in _greedy_pairs(_gguf(exported, "gguf-q8_0", logits_all=True), reference, prompts):
        assert got[:3] == want[:3]
    tok = reference[1]
    ids = prompt_ids(tok, prompts[0])
    got, _ = gguf_run(_gguf(exported, "gguf-q4_k_m"), ids, 16, ids)
    assert got and all(0 <= t < 128256 for t in got)


def test_verify_cli_reports_agreement(exported):
    out = subprocess.run([sys.executable, "-m", "kit.cli", "verify", str(exported)], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    for target in ("merged16", "gguf-f16", "gguf-bf16", "gguf-q8_0", "gguf-q4_k_m"):
        assert target in out.stdout
    assert "DISAGREES" not in out.stdout


# ---------------------------------------------------------------- bad input: clear errors, nothing half-written

@pytest.fixture
def run_copy(demo_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(demo_run[0] / "adapter", run / "adapter")
    return run


def test_run_without_adapter(tmp_path):
    with pytest.raises(ex.ExportError, match="no adapter"):
        ex.export(tmp_path, "merged16")


def test_corrupt_adapter_file(run_copy):
    (run_copy / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ex.ExportError, match="corrupt"):
        ex.export(run_copy, "merged16")
    assert not (run_copy / "export" / "merged16").exists()


def test_adapter_for_a_different_base_shape(run_copy, tmp_path):
    from kit.tiny import llama31_config
    from transformers import LlamaForCausalLM
    cfg = llama31_config("tiny")
    cfg.hidden_size, cfg.intermediate_size = 512, 1024
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "other")
    c = json.loads((run_copy / "adapter" / "adapter_config.json").read_text())
    c["base_model_name_or_path"] = str(tmp_path / "other")
    (run_copy / "adapter" / "adapter_config.json").write_text(json.dumps(c))
    with pytest.raises(ex.ExportError, match="another shape"):
        ex.export(run_copy, "merged16")


def test_unknown_quant(run_copy):
    with pytest.raises(ex.ExportError, match="unknown GGUF type"):
        ex.export(run_copy, "gguf", "q3_x")


def test_not_enough_disk_is_refused_before_writing(demo_run, run_copy, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ex.ExportError, match="not enough disk"):
        ex.export(run_copy, "gguf", "f16")
    assert not (run_copy / "export").exists() or not any((run_copy / "export").iterdir())


def test_disk_filling_up_mid_write_leaves_no_partial_export(run_copy, monkeypatch):
    import gguf

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    with pytest.raises(ex.ExportError, match="disk filled up"):
        ex.export(run_copy, "gguf", "f16")
    leftovers = list((run_copy / "export").iterdir()) if (run_copy / "export").exists() else []
    assert leftovers == [], leftovers
