"""An FP8 checkpoint with static scales from a 16-bit Llama folder, to measure what calibrated activation
scales buy over vLLM's dynamic FP8 (`kit serve --fp8`). A measurement tool, not an export the kit ships:
docs/benchmarks.md has the figure (2% at one request on an H200) and why `kit export` has no FP8 target.

    python bench/fp8_static.py MODEL_DIR OUT_DIR --data rows.jsonl     # --device cpu for a small model
    vllm serve OUT_DIR ...                                             # vLLM reads it as quant_method fp8

Weights: one FP8 E4M3 scale per linear layer (absmax / 448). Activations: one static scale per linear layer,
the absmax of its input over the first --rows rows (instruction and output) of the KoAlpaca-format data. The
LM head stays 16-bit, as vLLM's FP8 keeps it.
"""
import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def input_absmax(model, tok, texts: list[str]) -> dict[str, float]:
    """The largest |input| each linear layer but the LM head saw over `texts`."""
    seen: dict[str, float] = {}

    def watch(name):
        def hook(_module, inputs, _output):
            seen[name] = max(seen.get(name, 0.0), inputs[0].detach().abs().amax().float().item())
        return hook
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            module.register_forward_hook(watch(name))
    with torch.no_grad():
        for text in texts:
            model(**tok(text, return_tensors="pt").to(model.device))
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="KoAlpaca-format JSONL for the activation scales")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, device_map=args.device)
    tok = AutoTokenizer.from_pretrained(args.model)
    rows = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines()[:args.rows]]
    absmax = input_absmax(model, tok, [r["instruction"] + "\n" + r.get("output", "") for r in rows])
    tensors = {}
    for name, weight in model.state_dict().items():
        layer = name.removesuffix(".weight")
        if layer not in absmax:
            tensors[name] = weight.contiguous().cpu()
            continue
        scale = weight.abs().amax().float() / FP8_MAX
        tensors[name] = (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).cpu()
        tensors[layer + ".weight_scale"] = scale.reshape(()).cpu()
        tensors[layer + ".input_scale"] = torch.tensor(absmax[layer] / FP8_MAX, dtype=torch.float32)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((args.model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static",
                                     "ignored_layers": ["lm_head"]}
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    for f in args.model.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, args.out / f.name)
    print(json.dumps({"linear_layers": len(absmax), "largest_input_scale": max(absmax.values()) / FP8_MAX}))


if __name__ == "__main__":
    main()
