"""Model loading with LoRA attached, through Unsloth or plain transformers + PEFT.

This is the only module that imports Unsloth. Unsloth patches transformers/TRL when imported, so
`activate()` runs before anything else heavy is imported.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from kit.config import Config

log = logging.getLogger("kit")


@dataclass
class Device:
    kind: str          # "cuda" or "cpu"
    name: str          # e.g. "NVIDIA H100 80GB HBM3" or "cpu (2 threads)"
    bf16: bool         # bf16 matmuls supported on this device

    @property
    def cuda(self) -> bool:
        return self.kind == "cuda"


def detect_device() -> Device:
    import torch
    if torch.cuda.is_available():
        return Device("cuda", torch.cuda.get_device_name(0), torch.cuda.is_bf16_supported())
    return Device("cpu", f"cpu ({torch.get_num_threads()} threads)", False)


def resolve_backend(cfg: Config) -> str:
    return "unsloth" if cfg.model.backend == "auto" else cfg.model.backend


def resolve_precision(cfg: Config, device: Device) -> str:
    p = cfg.model.precision
    if p == "auto":
        p = ("bf16" if device.bf16 else "fp16") if device.cuda else "fp32"
    if p == "fp32" and device.cuda:
        log.warning("precision fp32 on a GPU: about twice the memory and much slower than bf16; the guide "
                    "advises bf16 (fp16 with loss scaling where bf16 is missing).")
    return p


def activate(backend: str) -> None:
    """Import Unsloth first, so its patches apply to the transformers/TRL imported afterwards."""
    if backend == "unsloth":
        import unsloth  # noqa: F401


def load_model(cfg: Config, model_path: str, precision: str, device: Device):
    import torch
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    if resolve_backend(cfg) == "unsloth":
        model = _load_unsloth(cfg, model_path, dtype)
    else:
        model = _load_hf(cfg, model_path, dtype, device)
    return model


def _token():
    import os
    return os.environ.get("HF_TOKEN") or None


def _lora_kwargs(cfg: Config) -> dict:
    lo = cfg.lora
    return dict(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=cfg.target_modules,
                bias=lo.bias, use_rslora=lo.use_rslora, modules_to_save=lo.modules_to_save or None)


def _load_unsloth(cfg: Config, path: str, dtype):
    from unsloth import FastLanguageModel
    m = cfg.model
    model, _ = FastLanguageModel.from_pretrained(
        model_name=path, max_seq_length=m.max_seq_length, dtype=dtype, load_in_4bit=m.load_in_4bit,
        token=_token(), revision=m.revision, use_exact_model_name=True)
    extra = {"use_dora": True} if cfg.lora.use_dora else {}
    return FastLanguageModel.get_peft_model(
        model, **_lora_kwargs(cfg), random_state=cfg.train.seed, max_seq_length=m.max_seq_length,
        use_gradient_checkpointing="unsloth" if cfg.train.gradient_checkpointing else False, **extra)


def _load_hf(cfg: Config, path: str, dtype, device: Device):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    m = cfg.model
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype) if m.load_in_4bit else None
    model = AutoModelForCausalLM.from_pretrained(
        path, revision=m.revision, token=_token(), dtype=dtype, quantization_config=quant,
        attn_implementation="sdpa", device_map={"": 0} if device.cuda else None)
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(cfg.train.seed)  # LoRA init, as Unsloth's random_state
    lora = LoraConfig(**_lora_kwargs(cfg), use_dora=cfg.lora.use_dora, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)
