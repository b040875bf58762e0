"""The Korean guide (docs/ko/) states step plans; every one must be what the kit really prints.

Every `python -m kit.recipes.llama31_sft --plan ...` command in a code block of docs/ko/*.md is written as a
console session: `$ command` followed by the output lines the text relies on (a subset of the real output,
in any order; `...` lines are skipped). Each command is run from the repository root with this
interpreter, and each stated line must appear, whitespace-normalised, as a whole line of its real output.
A stated line starting with `error:` means the command must fail. Self-contained on purpose: no conftest
or shared test helpers.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PLAN_CMD = "python -m kit.recipes.llama31_sft --plan"
FENCE = re.compile(r"^\s*(```|~~~)")


def _repo_root() -> Path:
    for d in Path(__file__).resolve().parents:
        if (d / "pyproject.toml").is_file() and (d / "kit").is_dir():
            return d
    raise RuntimeError("repository root (pyproject.toml + kit/) not found above " + __file__)


ROOT = _repo_root()
GUIDE_DIR = ROOT / "docs" / "ko"


@dataclass
class Stated:
    doc: str
    line: int
    command: str
    expected: list[str] = field(default_factory=list)
    prompted: bool = True  # written as `$ command`

    @property
    def id(self) -> str:
        tail = self.command[len(PLAN_CMD):].strip()
        return f"{self.doc}:{self.line}:{tail}"[:120]


def _norm(line: str) -> str:
    return " ".join(line.split())


def code_blocks(text: str):
    """(first line number, lines) of each fenced code block."""
    block, start, fence = None, 0, None
    for no, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if block is None:
            if m:
                block, start, fence = [], no + 1, m.group(1)
        elif m and line.strip() == fence:
            yield start, block
            block = None
        else:
            block.append(line)
    if block is not None:
        raise AssertionError(f"unclosed code block starting at line {start - 1}")


def stated_plans(path: Path) -> list[Stated]:
    found: list[Stated] = []
    for start, lines in code_blocks(path.read_text(encoding="utf-8")):
        current = None
        i = 0
        while i < len(lines):
            raw, no = lines[i], start + i
            text = raw.strip()
            prompted = text.startswith("$ ")
            body = text[2:].strip() if prompted else text
            if body.startswith(PLAN_CMD) or (prompted and "kit.recipes.llama31_sft" in body and "--plan" in body):
                while body.endswith("\\") and i + 1 < len(lines):  # continued command line
                    i += 1
                    body = body[:-1].rstrip() + " " + lines[i].strip().lstrip(">").strip()
                current = Stated(path.name, no, body, prompted=prompted)
                found.append(current)
            elif prompted:
                current = None  # another command: its output is not checked here
            elif current is not None and text and text != "...":
                current.expected.append(_norm(text))
            i += 1
    return found


def all_stated() -> list[Stated]:
    docs = sorted(GUIDE_DIR.glob("*.md"))
    return [s for d in docs for s in stated_plans(d)]


STATED = all_stated() if GUIDE_DIR.is_dir() else []


def run_plan(command: str) -> subprocess.CompletedProcess:
    argv = shlex.split(command, comments=True)
    assert argv[:3] == ["python", "-m", "kit.recipes.llama31_sft"], argv
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True,
                          encoding="utf-8", timeout=600, env=env)


def test_guide_exists_and_states_plans():
    assert (GUIDE_DIR / "README.md").is_file(), "docs/ko/README.md is missing"
    assert len(STATED) >= 10, f"expected the Korean guide to show its --plan commands, found {len(STATED)}"


@pytest.mark.parametrize("stated", STATED, ids=[s.id for s in STATED])
def test_stated_plan_matches_the_kit(stated: Stated):
    where = f"{stated.doc} line {stated.line}: {stated.command}"
    assert stated.prompted, f"{where}\nwrite plan commands as '$ {PLAN_CMD} ...' followed by their output"
    assert stated.expected, f"{where}\nstates no output; show the plan lines the text relies on after it"
    res = run_plan(stated.command)
    out = res.stdout + "\n" + res.stderr
    actual = {_norm(line) for line in out.splitlines() if line.strip()}
    wants_error = any(line.startswith("error:") for line in stated.expected)
    if wants_error:
        assert res.returncode != 0, f"{where}\nthe guide says this fails, but it exited 0:\n{out}"
    else:
        assert res.returncode == 0, f"{where}\nexited {res.returncode}:\n{out}"
    missing = [line for line in stated.expected if line not in actual]
    assert not missing, (f"{where}\nthe guide states lines the kit does not print:\n  "
                         + "\n  ".join(missing) + f"\nreal output:\n{res.stdout}{res.stderr}")


def _plans_with(*words: str) -> list[Stated]:
    return [s for s in STATED if all(w in s.command.split() for w in words)]


def test_guide_keeps_the_worked_examples():
    """The two worked examples are stated (and so checked above), with the figures the text quotes."""
    first = [s for s in _plans_with("--examples", "2400", "train.save_strategy=epoch")
             if len(s.command.split()) == 7]
    assert first, "the 2,400-example plan (batch 8 x accumulation 4, save per epoch) is missing"
    lines = set().union(*(s.expected for s in first))
    assert {"steps per epoch 75", "total steps 225",
            "checkpoints checkpoint-75, checkpoint-150, checkpoint-225"} <= lines, lines
    second = _plans_with("--examples", "10000", "train.per_device_train_batch_size=10",
                         "train.gradient_accumulation_steps=1")
    assert second, "the 10,000-example plan at batch 10 is missing"
    assert any("steps per epoch 1,000" in s.expected for s in second)
