"""Install one pinned requirements file into a virtual environment (pip, --no-deps), showing a numbered line per
package as pip reaches it, the size of large downloads and the progress of any package compiled from source; pip's
warnings and errors pass through. The Makefile's setup targets run it:

    python3 requirements/install.py VENV REQUIREMENTS
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

PACKAGE = re.compile(r"(?:Collecting|Processing) (\S+)")  # pip names each package once, as it starts on it
LARGE = re.compile(r"\s*Downloading \S+ \(([\d.]+ [MG]B)\)")  # the downloads that take a while


def progress(pip_output: Iterable[str], total: int) -> Iterator[str]:
    """The lines to show for pip's standard output."""
    done = 0
    for line in pip_output:
        if m := PACKAGE.match(line):
            done += 1
            yield f"  {done}/{total} {m[1].rsplit('/', 1)[-1]}"  # a local file: its name
        elif m := LARGE.match(line):
            yield f"    downloading {m[1]}"
        elif line.lstrip().startswith("Building wheel"):
            yield f"  {line.strip()}"
        elif line.startswith("Installing collected packages"):
            yield f"  installing them (pip is silent until all {done} are in place) ..."


def main(venv: str, requirements: str) -> int:
    pins = [s for s in Path(requirements).read_text().splitlines() if s.strip() and not s.lstrip().startswith("#")]
    print(f"  {len(pins)} pinned packages from {requirements}", flush=True)
    pip = subprocess.Popen([str(Path(venv, "bin", "python")), "-m", "pip", "install", "--no-deps",
                            "--disable-pip-version-check", "-r", requirements],
                           stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for shown in progress(pip.stdout, len(pins)):
        print(shown, flush=True)
    return pip.wait()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
