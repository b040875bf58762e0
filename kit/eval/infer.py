"""Greedy generation from a run's base model + adapter with transformers/PEFT (no Unsloth), as a
user or a serving stack would load it."""
from __future__ import annotations

from pathlib import Path

from kit.models.template import continuation
from kit.run.rundir import read_adapter


def load_adapter_model(run_dir: Path, dtype: str = "float32"):
    """(model, tokenizer): the run's adapter on top of the 16-bit base it applies to."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    adapter = read_adapter(run_dir)
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(adapter.base, dtype=torch_dtype,
                                                 **on_gpu(adapter.base, torch_dtype.itemsize))
    model = PeftModel.from_pretrained(model, str(adapter.path)).eval()
    return model, AutoTokenizer.from_pretrained(str(adapter.path))


def on_gpu(model: str, bytes_per_weight: int = 4) -> dict:
    """from_pretrained's placement: the GPU when one has room for the model (an 8B reference in fp32 takes hours
    on CPU), else the CPU (e.g. beside a vLLM server that holds most of the GPU)."""
    import torch

    from kit.train.memory import GIB, base_model_config, weights_gib
    if not torch.cuda.is_available():
        return {}
    shape = base_model_config(model, network=True)
    need = weights_gib(shape, 2) * bytes_per_weight / 2 * 1.1 if shape else 0.0  # + activations of a short prompt
    return {"device_map": "cuda"} if torch.cuda.mem_get_info()[0] / GIB >= need else {}


def generate(model, tokenizer, messages: list[dict], max_new_tokens: int = 64) -> str:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    return continuation(model, tokenizer, ids, max_new_tokens)
