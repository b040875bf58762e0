"""Exports of a real model of another chat family: the smollm2 recipe's run (SmolLM2-135M-Instruct, ChatML,
trained once per session: tests/conftest.py), exported as users do (kit export, once per format) and read back by
transformers and llama.cpp; and the rules that pick a GGUF's tokenizer (llama.cpp's pre-tokenizer) and Modelfile
for a run. Llama 3.1's exports: tests/test_export.py. Greedy tokens are compared where the reference decides them
by more than twice the tolerance (tests.helpers)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kit.core.errors import ExportError
from kit.export.gguf import check_exportable, pre_type
from kit.models.families import CHATML
from kit.models.template import chat_format, render
from tests.helpers import decided_tokens, question

QUANTS = ("f16", "q8_0", "q4_k_m")
TOLERANCE = {"f16": 0.5, "q8_0": 1.0}  # max |logit difference| against the merged model, as in test_export.py
# Korean and English with digits, and the chat markers as the template writes them
TEXTS = ["배치 크기는 32이고 학습률은 0.0002입니다. 에포크는 3번, 총 1,024 스텝!",
         "What is 1 + 1? It's 2; 12345 x 3.14 = 38762.1 (I've checked 'RE 2024-07-26).",
         "<|im_start|>user\n대한민국의 수도는 어디인가요? 2개만<|im_end|>\n<|im_start|>assistant\n"]


def _kit(*args, timeout=900):
    out = subprocess.run([sys.executable, "-m", "kit.cli", *map(str, args)], capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


@pytest.fixture(scope="module")
def exported(smollm2_run, tmp_path_factory):
    """A copy of the session's smollm2 run (its adapter and record; the session's run stays as trained), exported
    through the CLI once per format."""
    run_dir = tmp_path_factory.mktemp("smollm2-export") / "smollm2"
    shutil.copytree(smollm2_run[0], run_dir, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "export"))
    _kit("export", run_dir, "--to", "merged16")
    for quant in QUANTS:
        out = _kit("export", run_dir, "--to", "gguf", "--quant", quant)
        assert f"exported gguf {quant} to {run_dir / 'export' / f'gguf-{quant}'}" in out.stdout
    return run_dir


@pytest.fixture(scope="module")
def merged(exported):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = exported / "export" / "merged16"
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def heldout(exported):
    """Questions of the run's eval split, as the recipe split them."""
    from kit.config.load import load_config
    from kit.data.rows import load_rows, split_eval
    cfg = load_config(exported / "config.yaml")
    _, rows = split_eval(load_rows(cfg.data.path), cfg.data.eval_ratio, cfg.train.seed, cfg.data.path)
    return [question(r) for r in rows.select(range(3))]


def _llama(exported, quant, **kw):
    import llama_cpp
    return llama_cpp.Llama(model_path=str(exported / "export" / f"gguf-{quant}" / f"smollm2-{quant}.gguf"),
                           verbose=False, **kw)


@pytest.mark.slow
def test_merged16_keeps_the_runs_chat_format(merged):
    from transformers import GenerationConfig
    model, tok = merged
    out = model.name_or_path
    assert json.loads((Path(out) / "config.json").read_text())["dtype"] == "bfloat16"
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert tok.chat_template == CHATML.template and chat_format(tok).family == "chatml"
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    gen = GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == [im_end, endoftext] and gen.pad_token_id == tok.pad_token_id and not gen.do_sample


@pytest.mark.slow
def test_gguf_carries_the_runs_chatml_format_and_modelfile(exported, merged):
    tok = merged[1]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for quant in QUANTS:
        md = _llama(exported, quant, vocab_only=True).metadata  # llama.cpp loads it
        assert md["general.architecture"] == "llama" and md["tokenizer.ggml.pre"] == "smollm", quant
        assert md["tokenizer.ggml.eos_token_id"] == md["tokenizer.ggml.eot_token_id"] == str(im_end), quant
        assert md["tokenizer.ggml.add_bos_token"] == "false", quant  # ChatML has no bos
        assert md["tokenizer.chat_template"] == CHATML.template, quant
        modelfile = (exported / "export" / f"gguf-{quant}" / "Modelfile").read_text()
        assert modelfile.startswith(f'FROM ./smollm2-{quant}.gguf\nTEMPLATE """{CHATML.modelfile}"""\n')
        assert modelfile.endswith('PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|endoftext|>"\n'
                                  "PARAMETER temperature 0\n")
    from gguf import GGUFReader
    names = {t.name for t in GGUFReader(str(exported / "export" / "gguf-f16" / "smollm2-f16.gguf")).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names  # tied: llama.cpp reuses the embedding


@pytest.mark.slow
def test_llama_cpp_tokenizes_as_the_run_tokenizer(exported, merged):
    tok = merged[1]
    llm = _llama(exported, "f16", vocab_only=True)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text, add_special_tokens=False)


@pytest.mark.slow
def test_llama_cpp_answers_a_heldout_question_as_the_merged_model(exported, merged, heldout):
    """Through the GGUF's own chat template (rendered as transformers renders the run's) and its stop token."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from kit.eval.verify import gguf_run, hf_run, prompt_ids
    model, tok = merged
    fmt = chat_format(tok)
    messages = [{"role": "user", "content": heldout[1]}]
    ids = prompt_ids(tok, heldout[1])
    want, logits = hf_run(model, ids, 64, stops=fmt.stop_ids, pad=tok.pad_token_id)
    for quant, tol in TOLERANCE.items():
        llm = _llama(exported, quant, n_ctx=512, logits_all=True)
        formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], "<|im_end|>", "<|im_start|>")
        prompt = formatter(messages=messages).prompt
        assert prompt.startswith("<|im_start|>user\n") and prompt == render(tok, messages, add_generation_prompt=True)
        n = decided_tokens(logits, len(ids), want, tol)
        assert n >= 3, f"the reference decides {n} tokens of {want}"
        got, _ = gguf_run(llm, ids, 64, ids + want, fmt.stop_ids)
        assert got[:n] == want[:n], quant
        answer = llm.create_chat_completion(messages, temperature=0, max_tokens=64)["choices"][0]
        decided = tok.decode(want[:n], skip_special_tokens=True).rstrip("\ufffd")  # a cut multi-byte character
        assert answer["message"]["content"].strip().startswith(decided.strip()), (quant, answer, decided)
        if n == len(want) and want[-1] in fmt.stop_ids:  # a whole answer: llama.cpp stops at <|im_end|> too
            assert got == want and answer["finish_reason"] == "stop", quant


@pytest.mark.slow
def test_verify_cli_agrees_for_the_smollm2_run(exported):
    """kit verify RUN (its built-in prompts): every target with an agreement threshold reproduces base + adapter's
    greedy tokens within it and stops where they stop. Its bound on max |Δlogit| for the 16-bit targets (0.5) is
    absolute, and SmolLM2's logits span about -35..43: rounding the merged weights to bf16 moves low-ranked logits by
    up to 0.62 on some prompts (0.2 among each position's top 10), so here that column is held to 1.0."""
    from kit.eval.verify import THRESHOLDS
    out = subprocess.run([sys.executable, "-m", "kit.cli", "verify", str(exported)], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode in (0, 1), out.stdout + out.stderr[-5000:]
    rows = {row[0]: row for row in (re.split(r"\s{2,}", line.strip()) for line in out.stdout.splitlines())}
    for target in ("merged16", *(f"gguf-{q}" for q in QUANTS)):
        _, agree, _, diff, stops, *_ = rows[target]
        least = THRESHOLDS[target][0]
        assert least is None or (float(agree.rstrip("%")) / 100 >= least and stops == "yes"), (target, out.stdout)
        if target in ("merged16", "gguf-f16"):
            assert float(diff) < 1.0, (target, out.stdout)


# ---------------------------------------------------------------- the rules, without a trained run

def _with_pre_tokenizer(tokenizer, pre_tokenizer: dict):
    """`tokenizer` (the bundled Llama 3.1 one) with another pre_tokenizer in its tokenizer.json."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    data["pre_tokenizer"] = pre_tokenizer
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)))
    tok.chat_template, tok.eos_token = tokenizer.chat_template, tokenizer.eos_token
    return tok


def test_the_pre_tokenizer_is_the_one_that_cuts_text_as_the_tokenizer(tokenizer):
    assert pre_type(tokenizer) == "llama-bpe"
    split = json.loads(tokenizer.backend_tokenizer.to_str())["pre_tokenizer"]  # Llama 3's: Split, then ByteLevel
    qwen2 = json.loads(json.dumps(split).replace(r"\\p{N}{1,3}", r"\\p{N}"))  # Qwen2's: digits one by one
    assert qwen2 != split and pre_type(_with_pre_tokenizer(tokenizer, qwen2)) == "qwen2"
    prefixed = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    with pytest.raises(ExportError, match=r"none of llama.cpp's pre-tokenizers the kit knows \(qwen2, llama-bpe, "
                                          r"smollm, gpt-2\) cuts text as the run's tokenizer \(Llama 3.x\) does"):
        pre_type(_with_pre_tokenizer(tokenizer, prefixed))


def test_an_architecture_other_than_llama_is_refused(tokenizer):
    with pytest.raises(ExportError, match=r"'llama' architecture \(Llama 3.x, SmolLM2\); the base Qwen/Qwen2.5-0.5B is "
                                          r"a 'qwen2' model. Export merged16"):
        check_exportable(tokenizer, {"model_type": "qwen2"}, "Qwen/Qwen2.5-0.5B")


def _sentencepiece_gemma():
    """A Gemma-3-like tokenizer: SentencePiece-style BPE (▁ for spaces, bytes as <0x..>), the kit's Gemma 3 template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from kit.models.template import install
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    vocab = {t: i for i, t in enumerate(specials + ["▁"] + list("abcdefghijklmnopqrstuvwxyz"))}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": specials[4:]})
    assert install(tok, "gemma3").family == "gemma3"
    return tok


def test_a_sentencepiece_tokenizer_is_refused_before_the_model_loads(adapter_run, monkeypatch):
    from kit.export import exporter as ex
    for f in (adapter_run / "adapter").glob("*token*"):
        f.unlink()
    _sentencepiece_gemma().save_pretrained(adapter_run / "adapter")
    monkeypatch.setattr(ex, "merged_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(ExportError, match=r"the run's tokenizer \(Gemma 3\) is not byte-level BPE .*kit export "
                                          r"RUN_DIR --to merged16.*convert_hf_to_gguf.py; nothing was written"):
        ex.export(adapter_run, "gguf", "f16")
    assert not (adapter_run / "export").exists()
    out = subprocess.run([sys.executable, "-m", "kit.cli", "export", str(adapter_run), "--to", "gguf"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Gemma 3" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (adapter_run / "export").exists()


def test_modelfile_follows_the_family_and_a_custom_template_gets_none(tokenizer):
    from kit.export.gguf import modelfile
    from kit.models.families import LLAMA3
    llama = modelfile("m.gguf", tokenizer)
    assert llama == (f'FROM ./m.gguf\nTEMPLATE """{LLAMA3.modelfile}"""\nPARAMETER stop "<|eot_id|>"\n'
                     'PARAMETER stop "<|eom_id|>"\nPARAMETER stop "<|end_of_text|>"\nPARAMETER temperature 0\n')
    custom = _with_pre_tokenizer(tokenizer, json.loads(tokenizer.backend_tokenizer.to_str())["pre_tokenizer"])
    custom.chat_template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    custom.eos_token = "<|end_of_text|>"
    assert chat_format(custom).family == "custom"
    assert modelfile("m.gguf", custom) == ('FROM ./m.gguf\nPARAMETER stop "<|end_of_text|>"\n'
                                           "PARAMETER temperature 0\n")
