"""GGUF for llama.cpp and Ollama, written by the kit with the `gguf` package (no llama.cpp checkout, no
network): f16, bf16 and q8_0 directly; the k-quants q4_k_m and q5_k_m from that f16 file through
llama.cpp's own quantizer (llama-cpp-python). Plus the Ollama Modelfile beside it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from kit.errors import ExportError, SetupError, install_extras
from kit.llama import BOS_ID, EOT, EOT_ID, STOP_TOKENS, SYSTEM_PREAMBLE, head_dim, header
from kit.template import LLAMA31_CHAT_TEMPLATE

DIRECT = ("f16", "bf16", "q8_0")
KQUANTS = ("q4_k_m", "q5_k_m")
QUANTS = DIRECT + KQUANTS


def _permute(w, n_head: int):
    """HF's rotary layout (halves) -> llama.cpp's (interleaved pairs), for Q and K."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope(cfg: dict) -> tuple[float, dict]:
    """(rope_theta, scaling dict) from a transformers 5 (rope_parameters) or 4 (rope_scaling) config."""
    rs = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return rs.get("rope_theta", cfg.get("rope_theta", 10000.0)), rs


def llama3_rope_factors(cfg: dict):
    """The per-frequency scale llama.cpp reads from rope_freqs.weight for Llama 3.1's 'llama3' scaling."""
    import numpy as np
    theta, rs = rope(cfg)
    if rs.get("rope_type") != "llama3":
        return None
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


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """llama.cpp's llama-bpe vocabulary, exactly vocab_size entries (the model's embedding rows): ids the
    tokenizer lacks become unused placeholders, tokens beyond the embedding are left out."""
    import gguf
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
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOT_ID)  # <|eot_id|>: an instruct model's turn ends there
    writer.add_eot_token_id(EOT_ID)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(True)
    writer.add_chat_template(LLAMA31_CHAT_TEMPLATE)


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


def modelfile(gguf_file: str) -> str:
    """An Ollama Modelfile: Llama 3.1's template (Go syntax) and its stop tokens."""
    return (f"FROM ./{gguf_file}\n"
            f'TEMPLATE """{header("system")}{SYSTEM_PREAMBLE}'
            f"{{{{ if .System }}}}{{{{ .System }}}}{{{{ end }}}}{EOT}"
            f"{{{{ range .Messages }}}}{header('{{ .Role }}')}{{{{ .Content }}}}{EOT}{{{{ end }}}}"
            f'{header("assistant")}"""\n'
            + "".join(f'PARAMETER stop "{t}"\n' for t in reversed(STOP_TOKENS))
            + "PARAMETER temperature 0\n")
