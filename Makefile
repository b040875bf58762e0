# One command sets everything up and runs the demo; one sets everything up and runs the tests.
#   make demo    train the tiny demo on CPU, then ask it a training question
#   make test    the linters and the whole test suite (CPU; GPU tests are skipped without CUDA)
PY      ?= python3
VENV    ?= .venv
SERVE   ?= .venv-serve
PIP_NO_DEPS = -m pip install -q --no-deps --disable-pip-version-check
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)

.PHONY: setup demo test clean
setup: $(VENV)/.kit-ready $(SERVE)/.kit-ready

$(VENV)/.kit-ready: requirements/cpu-train.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/python $(PIP_NO_DEPS) -r requirements/cpu-train.txt
	$(VENV)/bin/python $(PIP_NO_DEPS) -e .
	touch $@

$(SERVE)/.kit-ready: requirements/cpu-serve.txt
	$(PY) -m venv $(SERVE)
	$(SERVE)/bin/python $(PIP_NO_DEPS) -r requirements/cpu-serve.txt
	touch $@

demo: setup
	$(VENV)/bin/python -m kit.recipes.llama31_sft --config demo run.overwrite=true
	$(VENV)/bin/python -m kit.cli ask runs/demo --prompt "독일의 수도는 어디인가요?"

test: setup
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/ruff check kit tests bench
	$(VENV)/bin/python -m pytest -q -rs tests

clean:
	rm -rf $(VENV) $(SERVE) runs
