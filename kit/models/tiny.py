"""Random-weight models of the Llama 3.1 architecture, built from a config: no download needed.

'tiny' runs anywhere in minutes (head_dim 128, which vLLM requires); '8b' is Llama 3.1 8B's exact
shape, for benchmarks on a GPU.
"""
from __future__ import annotations

from pathlib import Path

from kit.core.io import atomic_dir
from kit.models.llama import BOS_ID, MAX_POSITIONS, STOP_TOKEN_IDS, VOCAB_SIZE
from kit.models.template import generation_config, load_tokenizer

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8),
}


# A random lm_head with the usual std 0.02 caps logits near 5 over 128k tokens, so no answer can become
# likely; a wider head lets the tiny model learn (memorise) answers in minutes.
HEAD_STD = {"tiny": 0.15}


def llama31_config(shape: str):
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=VOCAB_SIZE, max_position_embeddings=MAX_POSITIONS, rope_theta=500000.0,
        bos_token_id=BOS_ID, eos_token_id=STOP_TOKEN_IDS, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        rms_norm_eps=1e-5, torch_dtype="bfloat16", **SHAPES[shape])


def build_random_model(shape: str, seed: int, out: Path) -> Path:
    """Write a random-weight Llama 3.1 model (bf16 safetensors + tokenizer + generation config) to
    `out` atomically; an existing complete copy is reused, so the same seed gives the same model."""
    import torch
    from transformers import LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: an fp32 8B would need 32 GB
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama31_config(shape))
            if shape in HEAD_STD:
                torch.nn.init.normal_(model.lm_head.weight, std=HEAD_STD[shape])
    finally:
        torch.set_default_dtype(default)
    tokenizer = load_tokenizer("bundled")
    model.generation_config = generation_config(tokenizer)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
    return out
