"""What the tests share besides fixtures (those are in conftest.py)."""
import functools
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from kit.config.load import RECIPES
from kit.models.llama import STOP_TOKEN_IDS

ROOT = Path(__file__).resolve().parents[1]


def make_default(variable: str) -> list[str]:
    """A Makefile variable's default, as arguments: make demo's settings (DEMO_TRAIN, DEMO_COMPARE), which the
    session's smollm2 run and its scores share, so the tests train and score what the demo shows."""
    found = re.search(rf"^{variable}\s*\?=(.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    return found.group(1).split()
ASSETS = ROOT / "tests" / "assets"
DEMO = str(RECIPES / "demo.yaml")  # the shipped recipe's file, passed as a path as users may


def run_recipe(args, cwd, timeout=1200, check=True):
    """Run the recipe as a user does, in a subprocess; returns CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    res = subprocess.run([sys.executable, "-m", "kit.recipes.llama31_sft", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"recipe failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


# The recipe, killed (SIGKILL, by itself) right after checkpoint-STEP is marked complete: where a kill between two
# checkpoints lands, at the same point on a fast machine or a slow one, as no kill timed from outside does.
_KILLED_AFTER = """
import os, signal, sys
from kit.train.callbacks import MarkComplete
mark = MarkComplete.on_save
def on_save(self, args, state, control, **kwargs):
    mark(self, args, state, control, **kwargs)
    if state.global_step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
MarkComplete.on_save = on_save
from kit.recipes.llama31_sft import main
sys.exit(main(sys.argv[1:]))
"""


def run_recipe_killed_after(step: int, args, cwd):
    """Run the recipe until checkpoint-`step` is complete, then SIGKILL it; returns CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    res = subprocess.run([sys.executable, "-c", _KILLED_AFTER.format(step=step), *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=1200)
    if res.returncode != -signal.SIGKILL:
        raise AssertionError(f"recipe not killed after checkpoint-{step} ({res.returncode}):\n{res.stderr[-5000:]}")
    return res


def train_rows(run_dir):
    """The demo's training rows (its eval split held out), as the recipe split them."""
    from kit.config.load import load_config
    from kit.data.rows import load_rows, split_eval
    cfg = load_config(run_dir / "config.yaml")
    rows, _ = split_eval(load_rows(cfg.data.path), cfg.data.eval_ratio, cfg.train.seed, cfg.data.path)
    return rows


def question(row) -> str:
    """The user turn of a KoAlpaca row, as the recipe trained it."""
    from kit.data.load import to_messages
    return to_messages(row, "alpaca", {}, None, "row")[0]["content"]


def edit_adapter_config(run_dir: Path, **changes) -> Path:
    cfg_file = run_dir / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(changes)
    cfg_file.write_text(json.dumps(cfg))
    return run_dir


# Two implementations (or one on AVX2, AVX-512 or a GPU) agree on logits within a tolerance, never exactly:
# where the reference's top two logits are closer than twice that tolerance, either may win. Tests compare
# the choices the reference makes decisively, never exact ties.

def top1_margin(logits):
    """The lead of the largest logit over the runner-up, per position (numpy or torch, last axis)."""
    top2 = np.sort(np.asarray(logits, dtype=np.float64), axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def decided_tokens(ref_logits, prompt_len: int, continuation: list[int], tolerance: float) -> int:
    """How many tokens of the reference's greedy `continuation` are decided by more than 2 x tolerance
    before its first near-tie; `ref_logits` cover prompt + continuation."""
    margins = top1_margin(ref_logits[prompt_len - 1: prompt_len - 1 + len(continuation)])
    close = np.flatnonzero(margins <= 2 * tolerance)
    return int(close[0]) if close.size else len(continuation)


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def decided_greedy_text(model, tokenizer, messages: list[dict], max_new_tokens: int, tolerance: float) -> str:
    """The model's greedy answer to `messages` (as kit.eval.infer.generate gives it) cut before its first near-tie:
    another implementation of the same weights may pick either token there. The whole answer when none."""
    import torch
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"].to(model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=STOP_TOKEN_IDS, pad_token_id=tokenizer.pad_token_id,
                             output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    margins = top1_margin(torch.cat(out.logits).float().cpu().numpy())
    close = np.flatnonzero(margins <= 2 * tolerance)
    n = int(close[0]) if close.size else len(tokens)
    return tokenizer.decode(tokens[:n], skip_special_tokens=True).rstrip("\ufffd")  # a cut multi-byte char


def adapter_reference(run_dir: Path, text: str, max_new_tokens: int = 48) -> str:
    """The run's greedy answer to the user turn `text` (base + adapter through PEFT, fp32: kit verify's
    reference) up to its first near-tie by kit verify's own bound for a server (two logits within TIE_NATS:
    bf16 rounding decides them); a served answer must start with it."""
    from kit.eval.verify import TIE_NATS
    return decided_greedy_text(*_adapter_model(str(run_dir)), [{"role": "user", "content": text}], max_new_tokens,
                               tolerance=TIE_NATS / 2)


@functools.lru_cache(maxsize=2)
def _adapter_model(run_dir: str):
    from kit.eval.infer import load_adapter_model
    return load_adapter_model(Path(run_dir))


BENCH = Path(__file__).parent.parent / "bench"


def bench_module(name: str):
    """A script of bench/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
