"""Padding-free batches keep examples apart on the GPU: each example's loss inside one packed row equals its
loss run alone (bf16 noise), while the same row with positions that do not restart (one long sequence,
attention across examples) does not. Skipped without a GPU; run through the device tool."""
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
from kit.backend import activate
from kit.config import load_config
cfg = load_config("demo", ["model.precision=bf16", "train.padding_free=true"])
backend = activate(cfg)
import torch
import torch.nn.functional as F
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from kit.data import load_rows, prepare
from kit.model import load_model
from kit.template import load_tokenizer
from kit.tiny import build_random_model

tok = load_tokenizer("bundled")
model = load_model(cfg, str(build_random_model("tiny", 0, Path(sys.argv[1]) / "base")), backend, checkpointing=False)
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

def losses(logits, labels, lengths):
    out, start = [], 0
    for n in lengths:
        lg, lb = logits[0, start:start + n - 1].float(), labels[0, start + 1:start + n]
        out.append(F.cross_entropy(lg, lb, ignore_index=-100).item())
        start += n
    return out

lengths = [len(e["input_ids"]) for e in examples]
cuda = lambda t: t.to("cuda")
with torch.no_grad():
    alone = [losses(model(input_ids=cuda(torch.tensor([e["input_ids"]]))).logits, torch.tensor([e["labels"]]), [n])[0]
             for e, n in zip(examples, lengths)]
    ids, pos, labels = cuda(packed["input_ids"]), cuda(packed["position_ids"]), packed["labels"]
    together = losses(model(input_ids=ids, position_ids=pos).logits.cpu(), labels, lengths)
    flat = torch.arange(ids.shape[1], device="cuda")[None]
    crossed = losses(model(input_ids=ids, position_ids=flat).logits.cpu(), labels, lengths)
print(json.dumps({"lengths": lengths, "alone": alone, "packed": together, "crossed": crossed,
                  "position_ids_restart": int((packed["position_ids"] == 0).sum()),
                  "boundary_labels": [int(packed["labels"][0, s]) for s in
                                      torch.tensor([0] + lengths[:-1]).cumsum(0).tolist()]}))
"""


def test_packed_examples_have_the_losses_they_have_alone(tmp_path):
    env = dict(os.environ, UNSLOTH_RETURN_LOGITS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    n = len(r["lengths"])
    assert r["position_ids_restart"] == n and r["boundary_labels"] == [-100] * n
    worst = max(abs(a - b) / a for a, b in zip(r["alone"], r["packed"]))
    assert worst < 0.01, r                                 # bf16 noise
    leaked = max(abs(a - b) / a for a, b in zip(r["alone"][1:], r["crossed"][1:]))
    assert leaked > 5 * max(worst, 1e-3), r                # the comparison can tell attention across examples
