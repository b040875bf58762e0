"""The errors a user can fix. Each message says what is wrong, where and what to do; the command line
prints it after "error:" and exits 2, without a traceback."""
from __future__ import annotations

import sys
import traceback

from kit.core import env


class KitError(Exception):
    """A problem in the user's input or files, phrased for the user."""


class ConfigError(KitError, ValueError):
    """Every configuration problem found at once, each naming where it was set (file and line, or
    override), its key and the fix."""

    def __init__(self, *problems: str):
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} problems in the configuration:" + "".join(
                f"\n  {i}. {p}" for i, p in enumerate(self.problems, 1))
        super().__init__(text)


class DataError(KitError, ValueError):
    """A data problem: which source, which row, what to do."""


class AdapterError(KitError, ValueError):
    """A run's adapter is missing, damaged or does not fit its base model."""


class ExportError(KitError, ValueError):
    """The export was not written; earlier exports are untouched."""


class PreflightError(KitError, ValueError):
    """The server was not started: what vLLM would refuse or get wrong, and what to do instead."""


class EvalError(KitError, ValueError):
    """kit eval did not run: what it is missing (a trained run, its held-out data, an export, a task) and how
    to provide it."""


class RunError(KitError, RuntimeError):
    """A run that the machine stopped: a full disk or an unwritable folder while training or saving."""


class SetupError(KitError, RuntimeError):
    """A package the command needs is not installed: which one, and the command that installs it."""


def install_extras(packages: str) -> str:
    """How to install packages of the kit's extras (trackers, lm-eval, llama.cpp), which `make demo` leaves out."""
    return (f"run `make setup-extras` in the kit's checkout, or pip install the {packages} that "
            "requirements/cpu-extras.txt (CPU) and requirements/gpu-train-lock.txt (CUDA) pin")


class ServerError(KitError, ValueError):
    """A running server cannot be reached or refused a request: what it answered and what to do."""


def exit_with(e: KitError) -> int:
    """Print a user's error as one message (its traceback too under KIT_DEBUG=1); the exit code, 2."""
    if env.debug():
        traceback.print_exception(e)
    print(f"error: {e}", file=sys.stderr)
    return 2
