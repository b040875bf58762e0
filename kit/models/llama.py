"""Llama 3.1 facts the kit relies on, each defined once: special tokens and their ids, the stop tokens,
the system preamble of its chat format, the vocabulary, the linear projections (what LoRA targets and
vLLM serves adapters for), head_dim and the RoPE: how long a sequence a base trains on."""
from __future__ import annotations

BOS, EOT, EOM, EOS = "<|begin_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"
PAD = "<|finetune_right_pad_id|>"
BOS_ID, EOT_ID, PAD_ID = 128000, 128009, 128004
STOP_TOKENS = {EOS: 128001, EOM: 128008, EOT: EOT_ID}  # generation ends at any of them
STOP_TOKEN_IDS = list(STOP_TOKENS.values())
VOCAB_SIZE = 128256
MAX_POSITIONS = 131072  # Llama 3.1's context, in tokens
# Past its positions, Unsloth keeps a 'llama3' RoPE as it is and widens the window (positions within it rotate as
# before, so the model exports and serves as trained); any other RoPE it stretches linearly, for training only.
# Unsloth's longest QLoRA context for Llama 3.1 8B on 80 GB (342,733 tokens) is 2.6 times its positions.
ROPE_STRETCH = 4
# Meta's template writes these dates into every system turn; models were trained with them
SYSTEM_PREAMBLE = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def head_dim(config: dict) -> int:
    """Per-head width from a model's config.json (older configs leave head_dim out)."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def projection_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(fan_in, fan_out) of each linear projection of a decoder layer, from a model's config.json."""
    h, i = config["hidden_size"], config["intermediate_size"]
    q = config["num_attention_heads"] * head_dim(config)
    kv = (config.get("num_key_value_heads") or config["num_attention_heads"]) * head_dim(config)
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def rope(config: dict) -> tuple[float, dict]:
    """(rope_theta, scaling dict) from a transformers 5 (rope_parameters) or 4 (rope_scaling) config.json."""
    scaling = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return scaling.get("rope_theta", config.get("rope_theta", 10000.0)), scaling


def widens(config: dict) -> bool:
    """Whether the base's RoPE is Llama 3's, which trains past its positions unchanged within them."""
    scaling = rope(config)[1]
    return (scaling.get("rope_type") or scaling.get("type")) == "llama3"


def positions(config: dict) -> int:
    """The positions a base was made for (max_position_embeddings in its config.json)."""
    return config.get("max_position_embeddings", MAX_POSITIONS)


def context_cap(config: dict) -> int:
    """The longest model.max_seq_length a base trains on: its positions, ROPE_STRETCH times them for a 'llama3'
    RoPE."""
    return positions(config) * ROPE_STRETCH if widens(config) else positions(config)
