"""Greedy generation from a run's base model + adapter with transformers/PEFT (no Unsloth), as a
user or a serving stack would load it."""
from __future__ import annotations

from pathlib import Path

from kit.rundir import read_adapter
from kit.template import chat_format


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

    from kit.memory import GIB, base_model_config, weights_gib
    if not torch.cuda.is_available():
        return {}
    shape = base_model_config(model, network=True)
    need = weights_gib(shape, 2) * bytes_per_weight / 2 * 1.1 if shape else 0.0  # + activations of a short prompt
    return {"device_map": "cuda"} if torch.cuda.mem_get_info()[0] / GIB >= need else {}


def generate(model, tokenizer, messages: list[dict], max_new_tokens: int = 64) -> str:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    return continuation(model, tokenizer, ids, max_new_tokens)


def continuation(model, tokenizer, ids, max_new_tokens: int) -> str:
    """The greedy continuation of the token ids `ids` (a 1 x n tensor), up to a stop token of the tokenizer's
    chat format, as text."""
    import torch
    stops = list(chat_format(tokenizer).stop_ids)
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
