"""CUDA-only paths: 4-bit QLoRA through both backends, 8-bit and paged optimizers, fp16 with loss
scaling. Skipped without a GPU; run on the H100 through the device tool (docs/benchmarks.md).
bitsandbytes' CPU backend (0.50) does carry NF4 + LoRA training and the paged 8-bit AdamW: that smoke test runs in
CI (tests/test_qlora_cpu.py). What stays here: the recipe end to end (it refuses model.load_in_4bit and 8-bit
optimizers on CPU), Unsloth's 4-bit path, and fp16."""
import json
import subprocess
import sys

import pytest

from tests.helpers import DEMO, run_recipe

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
SHORT = ["model.load_in_4bit=true", "train.max_steps=30", "train.logging_steps=1", "train.eval_strategy=no",
         "train.save_strategy=no", "train.learning_rate=2e-3"]


@pytest.mark.parametrize("backend, optim, precision, packing", [("unsloth", "paged_adamw_8bit", "auto", "true"),
                                                                ("hf", "adamw_8bit", "fp16", "false")])
def test_qlora_trains_on_gpu(tmp_path, backend, optim, precision, packing):
    run_recipe(["--config", DEMO, f"run.output_dir={tmp_path}", f"run.name={backend}", f"model.backend={backend}",
                f"train.optim={optim}", f"model.precision={precision}", f"train.packing={packing}", *SHORT],
               cwd=tmp_path)
    run_dir = tmp_path / backend
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
    assert losses[-1] < losses[0]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["device"].startswith("NVIDIA") and manifest["backend"] == backend
    assert manifest["precision"] == ("bf16" if precision == "auto" else precision)
    assert manifest["result"]["peak_kind"].startswith("GPU")
    assert (run_dir / "adapter/adapter_model.safetensors").is_file()


def test_tiled_mlp_trains_as_the_whole_mlp(tmp_path):
    # Unsloth's tiled MLP runs each layer's MLP over tiles of hidden-size rows (many here) and recomputes them in
    # backward: the same sums in another order, so the same losses step by step
    losses = {}
    for tiled in ("false", "true"):
        run_recipe(["--config", DEMO, f"run.output_dir={tmp_path}", f"run.name=tiled-{tiled}",
                    "train.gradient_checkpointing=true", f"train.tiled_mlp={tiled}", *SHORT], cwd=tmp_path)
        run_dir = tmp_path / f"tiled-{tiled}"
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        losses[tiled] = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
        batches = json.loads((run_dir / "manifest.json").read_text())["result"]["batches"]
        assert ("MLP tiled" in batches) == (tiled == "true")
    assert losses["true"][-1] < losses["true"][0] and len(losses["true"]) == len(losses["false"])
    assert all(abs(a / b - 1) < 0.02 for a, b in zip(losses["true"], losses["false"]))


KEPT = """
import sys
from kit.config.load import load_config
from kit.models.template import load_tokenizer
from kit.train.backend import activate
from kit.train.model import load_model
cfg = load_config("demo", ["model.load_in_4bit=true", "lora.dropout=0"])
backend = activate(cfg)
ids = load_tokenizer("bundled")("배치 크기란 무엇인가요?", return_tensors="pt")["input_ids"].cuda()
for kept in (0, 1):
    model = load_model(cfg, sys.argv[1], backend, checkpointing=True, tiled_mlp=False, kept_layers=kept)
    backend.unsloth.FastLanguageModel.for_training(model)  # as Unsloth's trainer does at its start
    layers = model.get_base_model().model.layers
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    model(input_ids=ids, labels=ids).loss.backward()
    print("calls", kept, calls)
"""


def test_kept_layers_are_not_recomputed(tmp_path, tiny_base):
    # a recomputed layer starts its forward twice a step (once more in the backward), a kept one once; the
    # layers the plan keeps stay kept through Unsloth's return to training
    out = subprocess.run([sys.executable, "-c", KEPT, str(tiny_base)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    calls = [line.split(" ", 2)[1:] for line in out.stdout.splitlines() if line.startswith("calls ")]
    assert calls == [["0", "[2, 2]"], ["1", "[2, 1]"]], out.stdout[-2000:] + out.stderr[-2000:]


@pytest.mark.xfail(strict=True, reason="Unsloth's FP8 base misses the bar on SmolLM2: 3.7% above bf16 at step 1, "
                   "102% at step 171 (docs/benchmarks.md); model.load_in_fp8 stays off by default until this passes")
def test_fp8_base_follows_the_bf16_base(tmp_path):
    # the bar for an FP8 path (issue 28): its loss within 1% of the bf16 path's at every logged step over 200 steps
    # on the real small model; the same rows in the same order, the base in bf16 or quantized to FP8 with a scale a row
    import torch
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("FP8 training needs a Hopper or newer GPU")
    losses = {}
    for name, base in (("bf16", []), ("fp8", ["model.load_in_fp8=true"])):
        run_recipe(["--config", "smollm2", f"run.output_dir={tmp_path}", f"run.name={name}", "train.max_steps=200",
                    "train.logging_steps=1", "train.eval_strategy=no", "train.save_strategy=no",
                    "train.sample_prompts=0", *base], cwd=tmp_path)
        run_dir = tmp_path / name
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
        assert json.loads((run_dir / "manifest.json").read_text())["result"]["quantization"] == name.replace(
            "bf16", "16-bit")
    assert len(losses["fp8"]) == len(losses["bf16"]) == 200 and losses["fp8"][-1] < losses["fp8"][0] / 2
    worst = max(abs(a / b - 1) for a, b in zip(losses["fp8"], losses["bf16"]))
    print(f"fp8 against bf16: worst step {worst:.2%}")
    assert worst < 0.01
