"""The base model with LoRA attached, through Unsloth or transformers + PEFT. Behind the import boundary
(see kit.train.backend): imported by kit.train.trainer once the backend is active."""
from __future__ import annotations

import peft
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from kit.config.schema import Config
from kit.core import env
from kit.train.backend import Backend

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_model(cfg: Config, path: str, backend: Backend, checkpointing: bool, tiled_mlp: bool, kept_layers: int = 0):
    """The PEFT model: `path` (a Hub id or folder) with cfg.lora's adapter, ready to train; `checkpointing`,
    `tiled_mlp` and `kept_layers` (Unsloth backend) as the plan resolved train.gradient_checkpointing and
    train.tiled_mlp (kit.train.plan.Execution)."""
    dtype = DTYPES[backend.precision]
    if backend.unsloth is not None:
        return _load_unsloth(cfg, path, dtype, backend, checkpointing, tiled_mlp, kept_layers)
    return _load_hf(cfg, path, dtype, backend, checkpointing)


def _lora_kwargs(cfg: Config) -> dict:
    lo = cfg.lora
    return dict(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=cfg.target_modules,
                bias=lo.bias, use_rslora=lo.use_rslora, modules_to_save=lo.modules_to_save or None)


def _load_unsloth(cfg: Config, path: str, dtype, backend: Backend, checkpointing: bool, tiled_mlp: bool,
                  kept_layers: int):
    m = cfg.model
    fast_language_model = backend.unsloth.FastLanguageModel
    # one process keeps Unsloth's own placement (as measured); under DDP each rank's copy goes on its own GPU
    placement = {"device_map": backend.device_map} if backend.world.size > 1 else {}
    fp8 = {"load_in_fp8": True} if m.load_in_fp8 else {}  # a CUDA-only argument: Unsloth's CPU loader refuses it
    model, _ = fast_language_model.from_pretrained(
        model_name=path, max_seq_length=m.max_seq_length, dtype=dtype, load_in_4bit=m.load_in_4bit,
        token=env.hf_token(), revision=m.revision, use_exact_model_name=True, unsloth_tiled_mlp=tiled_mlp,
        **fp8, **placement)
    extra = {"use_dora": True} if cfg.lora.use_dora else {}
    if checkpointing and kept_layers:  # these layers keep their activations: no recompute for them
        extra["checkpoint_skip_layers"] = kept_layers
    return fast_language_model.get_peft_model(
        model, **_lora_kwargs(cfg), random_state=cfg.train.seed, max_seq_length=m.max_seq_length,
        use_gradient_checkpointing="unsloth" if checkpointing else False, **extra)


def _load_hf(cfg: Config, path: str, dtype, backend: Backend, checkpointing: bool):
    m = cfg.model
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype) if m.load_in_4bit else None
    model = AutoModelForCausalLM.from_pretrained(
        path, revision=m.revision, token=env.hf_token(), dtype=dtype, quantization_config=quant,
        attn_implementation="sdpa", device_map=backend.device_map)
    if quant is not None:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(cfg.train.seed)  # LoRA init, as Unsloth's random_state
    lora = peft.LoraConfig(**_lora_kwargs(cfg), use_dora=cfg.lora.use_dora, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, lora)
