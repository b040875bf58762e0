"""CUDA-only paths: 4-bit QLoRA through both backends, 8-bit and paged optimizers, fp16 with loss
scaling. Skipped without a GPU; run on the H100 through the device tool (docs/benchmarks.md).
bitsandbytes' CPU backend (0.50) does carry NF4 + LoRA training and the paged 8-bit AdamW: that smoke test runs in
CI (tests/test_qlora_cpu.py). What stays here: the recipe end to end (it refuses model.load_in_4bit and 8-bit
optimizers on CPU), Unsloth's 4-bit path, and fp16."""
import json

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
