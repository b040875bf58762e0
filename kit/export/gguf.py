"""GGUF for llama.cpp and Ollama, written by the kit with the `gguf` package (no llama.cpp checkout, no
network): f16, bf16 and q8_0 directly; the k-quants q4_k_m and q5_k_m from that f16 file through
llama.cpp's own quantizer (llama-cpp-python). Plus the Ollama Modelfile beside it.

The vocabulary, special tokens, chat template and stop tokens are the run's (its tokenizer and chat family,
kit.models.template); llama.cpp's architecture is 'llama' (Llama 3.x, SmolLM2) and its tokenizer byte-level BPE,
with the pre-tokenizer (PRE_TYPES) that cuts text as the run's tokenizer does. Anything else is refused before the model
loads (check_exportable), with the way to get a GGUF of it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from kit.config.export import DIRECT, KQUANTS
from kit.core.errors import ExportError, SetupError, install_extras
from kit.models.families import FAMILIES
from kit.models.llama import head_dim, rope, widens
from kit.models.template import chat_format


def _permute(w, n_head: int):
    """HF's rotary layout (halves) -> llama.cpp's (interleaved pairs), for Q and K."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg: dict):
    """The per-frequency scale llama.cpp reads from rope_freqs.weight for Llama 3.1's 'llama3' scaling."""
    import numpy as np
    if not widens(cfg):
        return None
    theta, rs = rope(cfg)
    dim = head_dim(cfg)
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    old, low, high, factor = (rs["original_max_position_embeddings"], rs["low_freq_factor"],
                              rs["high_freq_factor"], rs["factor"])
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


TENSOR_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")  # model.layers.N.<module>.weight
    return f"blk.{parts[2]}.{TENSOR_NAMES['.'.join(parts[3:-1])]}.weight"


# llama.cpp's pre-tokenizers (tokenizer.ggml.pre) the kit writes, each with the models it is for and its regexes as
# llama.cpp applies them: in turn, each cutting the pieces the one before left (text between matches stays a piece).
# Tried in this order, the first that gives the run's tokenizer's own tokens on CHECK_TEXT wins (as llama.cpp's
# convert_hf_to_gguf.py decides, from the tokens of a check text); one that cuts digits one by one comes before its
# counterpart that groups them: where both give the same tokens, the vocabulary was trained with digits cut apart.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
PRE_TYPES = {
    "qwen2": ("Qwen2, Qwen2.5, Qwen3", (_LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}"),)),
    "llama-bpe": ("Llama 3.x", (_LLAMA3,)),
    "smollm": ("SmolLM, SmolLM2", (r"\p{N}", _GPT2)),
    "gpt-2": ("GPT-2's pattern", (_GPT2,)),
}
# What the pre-tokenizers cut differently: digit runs, contractions in either case, punctuation before words, runs
# of spaces, tabs and line breaks before words, Korean, CJK, emoji. A run of whitespace right before a digit is left
# out: transformers, converting SmolLM2's GGUF (kit:smollm2), drops llama.cpp's digit split from its tokenizer, which
# changes the tokens only there ('\n\n1.' is 'Ċ Ċ 1 .' in the run's tokenizer, 'ĊĊ 1 .' in SmolLM2's own and llama.cpp).
CHECK_TEXT = ("배치 크기는 32, 학습률은 0.0002입니다. 3 33 333 3333 12345 3.14 1,000,000\n"
              "I've been 'told he's there; 'RE you sure? We'Ve a'lL (normal) x=y+1 -- ......!!! ???\n\n"
              "  Hello\tworld\n   \n 你好世界 🦙🦙 ✅ naïve café\r\n")


def _title(tokenizer) -> str:
    fam = FAMILIES.get(chat_format(tokenizer).family)
    return fam.title if fam else "a chat family the kit does not know"


def pre_type(tokenizer) -> str:
    """The llama.cpp pre-tokenizer that cuts text as `tokenizer` does (PRE_TYPES); ExportError for a tokenizer that
    is not byte-level BPE, or that none of them reproduces."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    if data["model"].get("type") != "BPE" or '"ByteLevel"' not in json.dumps(data.get("pre_tokenizer")):
        raise ExportError(
            f"GGUF: the run's tokenizer ({_title(tokenizer)}) is not byte-level BPE (a SentencePiece vocabulary, as "
            "Gemma's and Mistral's), and the kit writes GGUF for byte-level BPE tokenizers only (Llama 3.x, SmolLM2, "
            "Qwen2). Export merged16 (kit export RUN_DIR --to merged16) and convert that folder with llama.cpp's "
            "convert_hf_to_gguf.py; nothing was written.")
    own = tokenizer.backend_tokenizer.encode(CHECK_TEXT, add_special_tokens=False).ids
    found = next((name for name, (_, patterns) in PRE_TYPES.items()
                  if _llama_cpp_ids(tokenizer, patterns, CHECK_TEXT) == own), None)
    if found is None:
        raise ExportError(
            f"GGUF: none of llama.cpp's pre-tokenizers the kit knows ({', '.join(PRE_TYPES)}) cuts text as the run's "
            f"tokenizer ({_title(tokenizer)}) does, so llama.cpp would read prompts as other tokens than the model was "
            "trained on. Export merged16 (kit export RUN_DIR --to merged16) and convert that folder with llama.cpp's "
            "convert_hf_to_gguf.py, which knows more tokenizers; nothing was written.")
    return found


def _llama_cpp_ids(tokenizer, patterns: tuple[str, ...], text: str) -> list[int]:
    """`text` as llama.cpp tokenizes it with these pre-tokenizer regexes and the tokenizer's own BPE."""
    import regex
    from tokenizers.pre_tokenizers import ByteLevel
    pieces = [text]
    for pattern in patterns:
        cut = []
        for piece in pieces:
            at = 0
            for m in regex.finditer(pattern, piece):
                cut += [piece[at:m.start()], m.group()]
                at = m.end()
            cut.append(piece[at:])
        pieces = [p for p in cut if p]
    to_bytes = ByteLevel(add_prefix_space=False, use_regex=False)  # GPT-2's byte-to-character map
    bpe = tokenizer.backend_tokenizer.model
    return [t.id for p in pieces for t in bpe.tokenize(to_bytes.pre_tokenize_str(p)[0][0])]


def check_exportable(tokenizer, config: dict, base: str) -> None:
    """Before any slow step: the model is one llama.cpp reads as 'llama' and its tokenizer one the kit writes."""
    if config.get("model_type") != "llama":
        raise ExportError(
            f"GGUF: the kit writes llama.cpp's 'llama' architecture (Llama 3.x, SmolLM2); the base {base} is a "
            f"'{config.get('model_type')}' model. Export merged16 (kit export RUN_DIR --to merged16) and convert that "
            "folder with llama.cpp's convert_hf_to_gguf.py; nothing was written.")
    pre_type(tokenizer)


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """llama.cpp's byte-level BPE vocabulary, exactly vocab_size entries (the model's embedding rows): ids the
    tokenizer lacks become unused placeholders, tokens beyond the embedding are left out. Its special tokens and
    chat template are the run's: eos and eot are the end of a turn, bos is added where the family's template
    writes it."""
    import gguf
    fmt = chat_format(tokenizer)
    fam = FAMILIES.get(fmt.family)
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = {**data["model"]["vocab"], **{t["content"]: t["id"] for t in data["added_tokens"]}}
    special = {t["id"] for t in data["added_tokens"] if t.get("special")}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        if i < vocab_size:
            tokens[i] = text
            types[i] = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    end = vocab[fmt.end_of_turn]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_type(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(end)  # an instruct model's turn ends there
    writer.add_eot_token_id(end)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(bool(fam and fam.bos and ("bos_token" in fmt.template or fam.bos in fmt.template)))
    writer.add_chat_template(fmt.template)


def write_gguf(model, tokenizer, path: Path, quant: str, name: str) -> None:
    import gguf
    import numpy as np
    import torch
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[quant]
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    cfg = model.config.to_dict()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_file_type(ftype)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(head_dim(cfg))
    w.add_rope_freq_base(rope(cfg)[0])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    add_tokenizer(w, tokenizer, cfg["vocab_size"])
    factors = llama3_rope_factors(cfg)
    if factors is not None:
        w.add_tensor("rope_freqs.weight", factors)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue  # the embedding's own rows: llama.cpp reads token_embd.weight for the output too
        data = t.to(torch.float32).numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, cfg["num_attention_heads"])
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, cfg["num_key_value_heads"])
        if data.ndim == 1:  # norms stay F32, as llama.cpp expects
            w.add_tensor(gguf_name(hf_name), data.astype(np.float32))
        else:
            packed = qtype != gguf.GGMLQuantizationType.F16  # bf16/q8_0 come back as bytes
            w.add_tensor(gguf_name(hf_name), gguf.quants.quantize(data, qtype), raw_dtype=qtype if packed else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def load_llama_cpp(purpose: str):
    """llama-cpp-python, which `make demo` leaves out: a checkout's `make setup-extras` compiles it once."""
    try:
        import llama_cpp
    except ImportError:
        raise SetupError(f"{purpose} needs llama-cpp-python, which is not installed: "
                         f"{install_extras('llama_cpp_python')} (it compiles llama.cpp once). "
                         f"GGUF {', '.join(DIRECT)} exports need only the gguf package.") from None
    return llama_cpp


def check_quantizer(quant: str, purpose: str) -> None:
    """Before any slow step: a k-quant needs llama.cpp's quantizer (the other types do not)."""
    if quant in KQUANTS:
        load_llama_cpp(purpose)


def kquantize(src: Path, dst: Path, quant: str) -> None:
    """llama.cpp's own k-quant quantizer, through llama-cpp-python."""
    llama_cpp = load_llama_cpp(f"--quant {quant} (llama.cpp's quantizer)")
    ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M}[quant]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise ExportError(f"llama.cpp's quantizer failed with code {rc} for {quant}.")


def modelfile(gguf_file: str, tokenizer) -> str:
    """An Ollama Modelfile: the run's chat family's template (Go syntax) and its stop tokens, the end of a turn first.
    A template the kit does not know gets no TEMPLATE (Ollama then reads the GGUF's chat template) and stops at its
    end of a turn."""
    fmt = chat_format(tokenizer)
    fam = FAMILIES.get(fmt.family)
    others = [t for t in reversed(tokenizer.convert_ids_to_tokens(list(fmt.stop_ids))) if t != fmt.end_of_turn]
    return (f"FROM ./{gguf_file}\n"
            + (f'TEMPLATE """{fam.modelfile}"""\n' if fam else "")
            + "".join(f'PARAMETER stop "{t}"\n' for t in [fmt.end_of_turn, *others])
            + "PARAMETER temperature 0\n")
