"""Padding-free batches keep examples apart on the GPU: each example's logits and loss inside one packed row
equal those it has alone (bf16 noise), while the same row with positions that do not restart (one long
sequence, attention across examples) does not. Skipped without a GPU; run through the device tool."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

# In a subprocess: Unsloth must be imported first, and UNSLOTH_RETURN_LOGITS=1 makes its training-mode
# forward return logits (by default its fused loss never builds them).
SCRIPT = r"""
import json, sys
from pathlib import Path
from kit.train.backend import activate
from kit.config.load import load_config
# max_seq_length above the packed row: Unsloth cuts longer inputs, which the row read as one sequence is
cfg = load_config("demo", ["model.precision=bf16", "train.padding_free=true", "model.max_seq_length=2048"])
backend = activate(cfg)
import torch
import torch.nn.functional as F
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from kit.data.load import load_rows, prepare
from kit.train.model import load_model
from kit.models.template import load_tokenizer
from kit.models.tiny import build_random_model

tok = load_tokenizer("bundled")
model = load_model(cfg, str(build_random_model("tiny", 0, Path(sys.argv[1]) / "base")), backend, checkpointing=False,
                   tiled_mlp=False)
model.train()
with torch.no_grad():  # LoRA B starts at zero: give the adapter an effect, so it is part of what is compared
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.02)
d = cfg.data
rows = load_rows(d.path).select(range(6))
examples = [dict(e) for e in prepare(rows, tok, fmt="auto", fields={}, system_prompt=None, max_len=256,
                                      responses_only=True, overlong="truncate", source="sample").dataset]
packed = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(examples)

def split(logits, lengths):
    bounds = torch.tensor([0] + lengths).cumsum(0).tolist()
    return [logits[0, a:b].float().cpu() for a, b in zip(bounds, bounds[1:])]

def loss(logits, labels):
    return F.cross_entropy(logits[:-1], torch.tensor(labels[1:]), ignore_index=-100).item()

lengths = [len(e["input_ids"]) for e in examples]
with torch.no_grad():
    alone = [model(input_ids=torch.tensor([e["input_ids"]], device="cuda")).logits[0].float().cpu() for e in examples]
    ids, pos = packed["input_ids"].to("cuda"), packed["position_ids"].to("cuda")
    together = split(model(input_ids=ids, position_ids=pos).logits, lengths)
    flat = torch.arange(ids.shape[1], device="cuda")[None]
    crossed = split(model(input_ids=ids, position_ids=flat).logits, lengths)
rel = lambda a, b: ((a - b).norm() / a.norm()).item()
print(json.dumps({"lengths": lengths,
                  "loss_alone": [loss(lg, e["labels"]) for lg, e in zip(alone, examples)],
                  "loss_packed": [loss(lg, e["labels"]) for lg, e in zip(together, examples)],
                  "packed_rel": [rel(a, b) for a, b in zip(alone, together)],
                  "crossed_rel": [rel(a, b) for a, b in zip(alone, crossed)],
                  "position_ids_restart": int((packed["position_ids"] == 0).sum())}))
"""


def test_packed_examples_have_the_losses_they_have_alone(tmp_path):
    env = dict(os.environ, UNSLOTH_RETURN_LOGITS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["position_ids_restart"] == len(r["lengths"])
    noise = max(r["packed_rel"])
    assert noise < 0.05, r                                  # per-example logits: bf16 noise through the layers
    assert max(abs(a - b) / a for a, b in zip(r["loss_alone"], r["loss_packed"])) < 0.01, r
    # the same row read as one sequence attends across examples: every example after the first changes (a
    # random tiny model in fp32 on CPU: 0.6-0.8 of the logits' norm), so the comparison can tell
    assert min(r["crossed_rel"][1:]) > 5 * max(noise, 1e-3), r
