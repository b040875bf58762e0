"""Export a run: the adapter merged into the 16-bit base (safetensors), and GGUF for llama.cpp/Ollama.

GGUF is written by the kit with the `gguf` package (no llama.cpp checkout, no network): f16, bf16 and
q8_0 directly; the k-quants q4_k_m and q5_k_m from that f16 file through llama.cpp's own quantizer
(llama-cpp-python). Every output is written under a temporary name and renamed when complete.

    kit export runs/demo --to merged16
    kit export runs/demo --to gguf --quant q8_0
"""
from __future__ import annotations

import errno
import json
import math
import shutil
import sys
from pathlib import Path

from kit.chat import BOS_ID, EOT_ID, LLAMA31_CHAT_TEMPLATE, generation_config

FORMATS = ("merged16", "gguf")
DIRECT = ("f16", "bf16", "q8_0")
KQUANTS = ("q4_k_m", "q5_k_m")
QUANTS = DIRECT + KQUANTS
BYTES_PER_WEIGHT = {"merged16": 2.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_k_m": 2.0 + 0.6, "q5_k_m": 2.0 + 0.7}


class ExportError(ValueError):
    """The export was not written: what is wrong and what to do; earlier exports are untouched."""


# ---------------------------------------------------------------- merge

def adapter_info(run_dir: Path) -> tuple[Path, dict]:
    adapter = Path(run_dir) / "adapter"
    cfg_file = adapter / "adapter_config.json"
    if not cfg_file.is_file():
        raise ExportError(f"{run_dir}: no adapter/adapter_config.json. Train the run first "
                          "(python -m kit.recipes.llama31_sft), or check the run directory.")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{cfg_file}: not valid JSON ({e}); the adapter is damaged, re-save it from a checkpoint.")
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise ExportError(f"{adapter}: adapter_model.safetensors is missing; re-save the adapter from a checkpoint.")
    return adapter, cfg


def merged_model(run_dir: Path):
    """(merged model in bf16, tokenizer). A QLoRA adapter is merged into the original bf16 weights
    named in its config, never into a de-quantized 4-bit copy."""
    import torch
    from peft import PeftModel
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from kit.serve import sixteen_bit_base
    adapter, cfg = adapter_info(run_dir)
    base, _ = sixteen_bit_base(cfg["base_model_name_or_path"])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    try:
        model = PeftModel.from_pretrained(model, str(adapter))
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{adapter}/adapter_model.safetensors cannot be read ({e}); the file is corrupt. "
                          "Re-save the adapter from a checkpoint.") from None
    except RuntimeError as e:
        if "size mismatch" in str(e):
            raise ExportError(f"{adapter} does not fit the base {base}: {str(e).splitlines()[1].strip()}. "
                              "The adapter was trained on a model of another shape.") from None
        raise
    return model.merge_and_unload(), AutoTokenizer.from_pretrained(str(adapter))


def check_space(target: Path, n_params: int, kind: str) -> None:
    need = n_params * BYTES_PER_WEIGHT[kind] * 1.05
    free = shutil.disk_usage(target.parent if target.parent.exists() else Path(".")).free
    if free < need:
        raise ExportError(f"not enough disk for {kind}: about {need / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB "
                          f"free under {target.parent}. Free space or export elsewhere; nothing was written.")


def _no_space(e: OSError) -> ExportError:
    return ExportError(f"the disk filled up while writing ({e.strerror}); the partial export was removed and "
                       "earlier exports are untouched. Free space and export again.")


def write_merged16(model, tokenizer, out: Path) -> None:
    model.generation_config = generation_config()
    model.save_pretrained(out, max_shard_size="5GB", safe_serialization=True)
    tokenizer.chat_template = LLAMA31_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)


# ---------------------------------------------------------------- GGUF

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
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if rs.get("rope_type") != "llama3":
        return None
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
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
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
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
    w.add_rope_dimension_count(head_dim)
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


def kquantize(src: Path, dst: Path, quant: str) -> None:
    """llama.cpp's own k-quant quantizer, through llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(f"--quant {quant} uses llama.cpp's quantizer: pip install llama-cpp-python "
                          "(f16, bf16 and q8_0 need only the gguf package).") from None
    ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M}[quant]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise ExportError(f"llama.cpp's quantizer failed with code {rc} for {quant}.")


def modelfile(gguf_file: str) -> str:
    """An Ollama Modelfile: Llama 3.1's template (Go syntax) and its stop tokens."""
    return (f"FROM ./{gguf_file}\n"
            'TEMPLATE """<|start_header_id|>system<|end_header_id|>\n\n'
            "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
            "{{ if .System }}{{ .System }}{{ end }}<|eot_id|>"
            "{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
            '<|start_header_id|>assistant<|end_header_id|>\n\n"""\n'
            'PARAMETER stop "<|eot_id|>"\nPARAMETER stop "<|eom_id|>"\nPARAMETER stop "<|end_of_text|>"\n'
            "PARAMETER temperature 0\n")


# ---------------------------------------------------------------- entry

def export(run_dir: Path, to: str, quant: str = "q8_0") -> Path:
    """Write RUN_DIR/export/merged16/ or RUN_DIR/export/gguf-<quant>/; returns the folder."""
    from kit.io import atomic_dir
    run_dir = Path(run_dir)
    if to not in FORMATS:
        raise ExportError(f"--to {to}: use {' or '.join(FORMATS)}.")
    if to == "gguf" and quant not in QUANTS:
        raise ExportError(f"--quant {quant}: unknown GGUF type; use one of {', '.join(QUANTS)}.")
    adapter_info(run_dir)
    target = run_dir / "export" / ("merged16" if to == "merged16" else f"gguf-{quant}")
    model, tokenizer = merged_model(run_dir)
    check_space(target, sum(p.numel() for p in model.parameters()), "merged16" if to == "merged16" else quant)
    try:
        with atomic_dir(target, replace=True) as tmp:
            if to == "merged16":
                write_merged16(model, tokenizer, tmp)
            else:
                name = f"{run_dir.resolve().name}-{quant}.gguf"
                if quant in KQUANTS:
                    write_gguf(model, tokenizer, tmp / "f16.gguf", "f16", run_dir.resolve().name)
                    kquantize(tmp / "f16.gguf", tmp / name, quant)
                    (tmp / "f16.gguf").unlink()
                else:
                    write_gguf(model, tokenizer, tmp / name, quant, run_dir.resolve().name)
                (tmp / "Modelfile").write_text(modelfile(name))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _no_space(e) from None
        raise
    return target


def add_arguments(p) -> None:
    p.add_argument("run_dir", type=Path)
    p.add_argument("--to", required=True, choices=FORMATS)
    p.add_argument("--quant", default="q8_0", help=f"GGUF type: {', '.join(QUANTS)} (default q8_0)")


def run_cli(args) -> int:
    try:
        out = export(args.run_dir, args.to, args.quant)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.to}{'' if args.to == 'merged16' else ' ' + args.quant} to {out}")
    return 0
