"""Exports of the demo's trained tiny model, checked against base + adapter; llama.cpp is the real one.
Logits agree within a tolerance per format; greedy tokens are compared where the reference decides them
by more than twice that tolerance (tests.helpers). Bad input: tests/test_export_errors.py."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from kit.eval.infer import load_adapter_model
from kit.eval.verify import gguf_run, hf_run, prompt_ids
from kit.export import exporter as ex
from kit.models.llama import EOT_ID, STOP_TOKEN_IDS
from kit.models.template import chat_format
from tests.helpers import decided_tokens, question, top1_margin, train_rows

pytestmark = pytest.mark.slow
TOLERANCE = {"merged16": 0.25, "gguf-f16": 0.5, "gguf-bf16": 1.0, "gguf-q8_0": 1.0,  # max |logit difference|
             "gguf-q4_k_m": 6.0}


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
    return [question(r) for r in rows] + ["배치 크기란 무엇인가요?", "What is the capital of France?"]


def _gguf(exported, folder, **kw):
    import llama_cpp
    path = next((exported / "export" / folder).glob("*.gguf"))
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False, **kw)


def _greedy_pairs(llm, reference, prompts, tolerance):
    """(transformers' greedy tokens, llama.cpp's) for the three trained questions, each cut before the
    reference's first near-tie."""
    ref_model, tok = reference
    stops = chat_format(tok).stop_ids
    pairs = []
    for p in prompts[:3]:
        ids = prompt_ids(tok, p)
        cont, logits = hf_run(ref_model, ids, 48, stops=stops, pad=tok.pad_token_id)
        n = decided_tokens(logits, len(ids), cont, tolerance)
        pairs.append((cont[:n], gguf_run(llm, ids, 48, ids + cont, stops)[0][:n]))
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
    tol, compared = TOLERANCE["merged16"], 0
    for p in prompts:
        ids = torch.tensor([prompt_ids(ref_tok, p)])
        with torch.no_grad():
            a, b = ref_model(ids).logits, model(ids).logits
        # bf16 rounding of the merged weights: a few hundredths on logits of this size
        assert (a - b).abs().max() < tol, p
        decided = torch.from_numpy(top1_margin(a) > 2 * tol)
        assert (a.argmax(-1) == b.argmax(-1))[decided].all(), p
        compared += int(decided.sum())
    assert compared >= len(prompts), "positions decided clearly enough to compare"


def test_f16_gguf_in_llama_cpp_matches_transformers_and_stops(exported, reference, prompts):
    ref_model, tok = reference
    llm = _gguf(exported, "gguf-f16", logits_all=True)
    tol, stops = TOLERANCE["gguf-f16"], chat_format(tok).stop_ids
    for i, p in enumerate(prompts):
        ids = prompt_ids(tok, p)
        cont, logits = hf_run(ref_model, ids, 48, stops=stops, pad=tok.pad_token_id)
        got, lg = gguf_run(llm, ids, 48, ids + cont, stops)
        n = decided_tokens(logits, len(ids), cont, tol)
        assert got[:n] == cont[:n], p  # the same greedy tokens, the stop token included
        assert float(np.abs(lg - logits).max()) < tol
        if i < 3:  # trained questions: the answer ends at <|eot_id|>, and llama.cpp stops there too where no
            assert cont[-1] == EOT_ID and len(cont) < 48  # near-tie came before it (got[:n] == cont[:n] then)
            assert n < len(cont) or (got[-1] == EOT_ID and len(got) == len(cont))


def test_gguf_carries_llama31_metadata(exported):
    from gguf import GGUFReader
    r = GGUFReader(str(next((exported / "export" / "gguf-f16").glob("*.gguf"))))
    fields = {k: r.fields[k] for k in r.fields}

    def scalar(key):
        f = fields[key]
        return f.parts[f.data[0]].tolist()[0] if f.types[0].name != "STRING" else bytes(f.parts[f.data[0]]).decode()
    assert scalar("general.architecture") == "llama"
    assert scalar("tokenizer.ggml.model") == "gpt2" and scalar("tokenizer.ggml.pre") == "llama-bpe"
    assert scalar("tokenizer.ggml.bos_token_id") == 128000 and scalar("tokenizer.ggml.eos_token_id") == EOT_ID
    assert scalar("tokenizer.ggml.eot_token_id") == EOT_ID
    assert "<|start_header_id|>" in scalar("tokenizer.chat_template")
    assert len(fields["tokenizer.ggml.merges"].data) > 200_000
    names = {t.name for t in r.tensors}
    assert "rope_freqs.weight" in names and "blk.0.attn_q.weight" in names and "output.weight" in names
    modelfile = (exported / "export" / "gguf-f16" / "Modelfile").read_text()
    assert 'PARAMETER stop "<|eot_id|>"' in modelfile and "FROM ./demo-f16.gguf" in modelfile


def test_bf16_gguf_matches_transformers_on_trained_questions(exported, reference, prompts):
    pairs = _greedy_pairs(_gguf(exported, "gguf-bf16", logits_all=True), reference, prompts, TOLERANCE["gguf-bf16"])
    for want, got in pairs:
        assert got == want
    assert any(want and want[-1] in STOP_TOKEN_IDS for want, _ in pairs), "a whole trained answer was compared"


def test_q8_0_agrees_on_first_tokens_and_q4_k_m_stays_near_the_trained_logits(exported, reference, prompts):
    for want, got in _greedy_pairs(_gguf(exported, "gguf-q8_0", logits_all=True), reference, prompts,
                                   TOLERANCE["gguf-q8_0"]):
        assert got[:3] == want[:3]
    # 4-bit rounding moves logits by up to ~5 here; an export that lost the adapter (or the weights) moves them by
    # its effect, ~23: the bound tells those apart, and the tokens decided beyond it must agree
    ref_model, tok = reference
    llm, tol = _gguf(exported, "gguf-q4_k_m", logits_all=True), TOLERANCE["gguf-q4_k_m"]
    for p in prompts:
        ids = prompt_ids(tok, p)
        cont, logits = hf_run(ref_model, ids, 48, stops=chat_format(tok).stop_ids, pad=tok.pad_token_id)
        got, lg = gguf_run(llm, ids, 48, ids + cont, chat_format(tok).stop_ids)
        assert float(np.abs(lg - logits).max()) < tol, p
        n = decided_tokens(logits, len(ids), cont, tol)
        assert got[:n] == cont[:n], p


def test_verify_cli_reports_agreement(exported, prompts):
    # the trained questions: their greedy answers are decided by wide margins, so no rounding flips them
    asked = [arg for p in prompts[:3] for arg in ("--prompt", p)]
    out = subprocess.run([sys.executable, "-m", "kit.cli", "verify", str(exported), *asked], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    for target in ("merged16", "gguf-f16", "gguf-bf16", "gguf-q8_0", "gguf-q4_k_m"):
        assert target in out.stdout
    assert "DISAGREES" not in out.stdout
