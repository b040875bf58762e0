"""The lora section: the adapter's rank, scale and the projections it targets, and whether vLLM can serve it."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Union

from kit.config.issue import Issue
from kit.models.llama import PROJECTIONS

TARGET_PRESETS = {"all-linear": list(PROJECTIONS), "qkv": ["q_proj", "k_proj", "v_proj"]}


@dataclass
class LoraConfig:
    r: int = 16
    """Rank of the LoRA matrices."""
    alpha: int = 32
    """LoRA scaling numerator (lora_alpha); the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    dropout: float = 0.0
    """Dropout on the LoRA input (0 lets Unsloth use its fastest path)."""
    target_modules: Union[str, list[str]] = "all-linear"
    """'all-linear' (the 7 projections), 'qkv' (q/k/v only, as in the guide's picture) or a list."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scaling."""
    use_dora: bool = False
    """DoRA; vLLM cannot serve it, so it also needs allow_unservable."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Train biases; anything but 'none' is not servable by vLLM."""
    modules_to_save: list[str] = field(default_factory=list)
    """Fully trained extra modules (e.g. embed_tokens, lm_head); not servable by vLLM as an adapter."""
    allow_unservable: bool = False
    """Opt in to DoRA, bias or modules_to_save although vLLM cannot serve the adapter (serve merged)."""


# ---------------------------------------------------------------- validation

def issues(lo: LoraConfig) -> Iterator[Issue]:
    if not 1 <= lo.r <= 512:
        yield Issue("lora.r", f"lora.r={lo.r}: use 1..512 (8-64 is usual).")
    if lo.alpha <= 0:
        yield Issue("lora.alpha", f"lora.alpha={lo.alpha}: must be > 0.")
    if not 0.0 <= lo.dropout < 1.0:
        yield Issue("lora.dropout", f"lora.dropout={lo.dropout}: use 0 <= dropout < 1.")
    if isinstance(lo.target_modules, str):
        if lo.target_modules not in TARGET_PRESETS:
            yield Issue("lora.target_modules", f"lora.target_modules='{lo.target_modules}': use "
                        f"{' or '.join(TARGET_PRESETS)} or a list of module names.")
    elif not lo.target_modules:
        yield Issue("lora.target_modules", "lora.target_modules is empty.")
    elif bad := [x for x in lo.target_modules if x not in PROJECTIONS]:
        yield Issue("lora.target_modules", f"lora.target_modules: {bad} are not Llama linear projections; choose "
                    f"from {list(PROJECTIONS)} (embed_tokens/lm_head go in lora.modules_to_save).")
    unservable = (["use_dora (vLLM does not serve DoRA adapters)"] if lo.use_dora else []) + \
        ([f"bias='{lo.bias}' (vLLM serves LoRA adapters without bias)"] if lo.bias != "none" else []) + \
        ([f"modules_to_save={lo.modules_to_save} (vLLM does not load fully trained modules from an adapter)"]
         if lo.modules_to_save else [])
    if unservable and not lo.allow_unservable:
        yield Issue("lora", "lora: " + "; ".join(unservable) + ". The adapter could not be served by vLLM. Set "
                    "lora.allow_unservable=true to train it anyway and serve the merged export instead.")
