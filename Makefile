# One command sets up what the demo needs and runs it; one sets everything up and runs the tests.
#   make demo          .venv (training and lm-eval), then fine-tune SmolLM2-135M-Instruct on CPU (the smollm2
#                      recipe) and show a held-out question's answers before and after, with both ROUGE-L scores
#   make test          everything (make setup), then the linters and the whole test suite
#   make serve         .venv-serve (vLLM), then serve RUN (default runs/demo) on 127.0.0.1:8000
#   make setup         everything: setup-train, setup-extras and setup-serve
#   make setup-train   .venv from requirements/cpu-train.txt: training, merged16 and f16/bf16/q8_0 GGUF exports
#   make setup-extras  requirements/cpu-extras.txt into .venv: trackers, lm-eval, llama.cpp (q4_k_m/q5_k_m GGUF)
#   make setup-serve   .venv-serve from requirements/cpu-serve.txt: vLLM's CPU build, for kit serve
#   make setup-browser Debian's chromium, its driver and Korean fonts (apt-get, as root) when missing: kit studio's
#                      browser test drives it
#   make setup-gpu     a CUDA 13 host: .venv (torch 2.12, Unsloth) and .venv-serve (vLLM 0.26, torch 2.11) from
#                      requirements/gpu-{train,serve}.txt, every version fixed by their *-lock.txt (extras
#                      included); demo, serve and setup-extras then keep these
PY      ?= python3
VENV    ?= .venv
SERVE   ?= .venv-serve
CHROMIUM ?= /usr/bin/chromium
RUN     ?= runs/demo
# make demo: the smollm2 recipe for 1 epoch instead of 2, and answers of at most 128 tokens (the longest answer in
# kit:ko_sample is 119) in one batch, so that setup, training and both evaluations fit in 8 minutes on 2 CPU cores;
# make demo DEMO_TRAIN= trains the recipe as shipped
DEMO_TRAIN   ?= train.num_train_epochs=1
DEMO_COMPARE ?= --max-new-tokens 128 --batch-size 16
# pip --no-deps, showing a numbered line per package
INSTALL = $(PY) requirements/install.py
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)

# an environment that make setup-gpu made is used as it is, never reinstalled with the CPU wheels (its
# requirements/gpu-train.txt holds the extras too)
TRAIN_ENV = $(if $(wildcard $(VENV)/.kit-gpu),$(VENV)/.kit-gpu,$(VENV)/.kit-ready)
EXTRAS_ENV = $(if $(wildcard $(VENV)/.kit-gpu),$(VENV)/.kit-gpu,$(VENV)/.kit-extras)
EVAL_ENV = $(if $(wildcard $(VENV)/.kit-gpu),$(VENV)/.kit-gpu,$(VENV)/.kit-eval)
SERVE_ENV = $(if $(wildcard $(SERVE)/.kit-gpu),$(SERVE)/.kit-gpu,$(SERVE)/.kit-ready)

.PHONY: setup setup-train setup-extras setup-serve setup-browser setup-gpu demo serve test clean
setup: setup-train setup-extras setup-serve
setup-train: $(VENV)/.kit-ready
setup-extras: $(EXTRAS_ENV)
setup-serve: $(SERVE)/.kit-ready
setup-gpu: $(VENV)/.kit-gpu $(SERVE)/.kit-gpu
setup-browser: $(CHROMIUM)

$(VENV)/.kit-ready: requirements/cpu-train.txt pyproject.toml
	$(PY) -m venv $(VENV)
	@echo "==> $(VENV): the training environment (torch CPU, Unsloth, TRL, PEFT)"
	$(INSTALL) $(VENV) requirements/cpu-train.txt
	$(VENV)/bin/python -m pip install -q --no-deps --disable-pip-version-check -e .
	touch $@

$(VENV)/.kit-extras: requirements/cpu-extras.txt $(VENV)/.kit-ready
	@echo "==> $(VENV): the extras (wandb, mlflow, lm-eval, llama-cpp-python: llama.cpp is compiled once)"
	$(INSTALL) $(VENV) requirements/cpu-extras.txt
	touch $@

# kit eval's part of the extras alone (lm-eval, rouge_score and what they import; no llama.cpp to compile): the
# demo's scores need it
$(VENV)/.kit-eval: requirements/cpu-extras.txt $(VENV)/.kit-ready
	@echo "==> $(VENV): lm-evaluation-harness (kit eval's part of requirements/cpu-extras.txt)"
	sed -n '/^# kit eval/,/^$$/p' requirements/cpu-extras.txt > $(VENV)/kit-eval.txt
	grep -q '^lm_eval==' $(VENV)/kit-eval.txt
	$(INSTALL) $(VENV) $(VENV)/kit-eval.txt
	touch $@

$(SERVE)/.kit-ready: requirements/cpu-serve.txt
	$(PY) -m venv $(SERVE)
	@echo "==> $(SERVE): the serving environment (vLLM's CPU build)"
	$(INSTALL) $(SERVE) requirements/cpu-serve.txt
	touch $@

# tests/test_studio.py drives the page in it (Playwright's client from requirements/cpu-extras.txt, no browser
# download); the fonts draw the Korean sample set in its screenshots
$(CHROMIUM):
	@echo "==> Debian's chromium and chromium-driver for kit studio's browser test (apt-get: run as root)"
	apt-get update
	apt-get install -y --no-install-recommends chromium chromium-driver fonts-noto-cjk

$(VENV)/.kit-gpu: requirements/gpu-train.txt requirements/gpu-train-lock.txt requirements/tokenizer.txt pyproject.toml
	$(PY) -m venv $(VENV)
	@echo "==> $(VENV): the CUDA training environment (torch 2.12, Unsloth, TRL, PEFT, bitsandbytes)"
	$(VENV)/bin/pip install -r requirements/gpu-train.txt -c requirements/gpu-train-lock.txt
	$(VENV)/bin/pip install --no-deps -r requirements/tokenizer.txt -e .
	touch $@

$(SERVE)/.kit-gpu: requirements/gpu-serve.txt requirements/gpu-serve-lock.txt
	$(PY) -m venv $(SERVE)
	@echo "==> $(SERVE): the CUDA serving environment (vLLM 0.26, torch 2.11)"
	$(SERVE)/bin/pip install -r requirements/gpu-serve.txt -c requirements/gpu-serve-lock.txt
	touch $@

demo: $(TRAIN_ENV) $(EVAL_ENV)
	$(VENV)/bin/python -m kit.recipes.llama31_sft --config smollm2 run.overwrite=true $(DEMO_TRAIN)
	$(VENV)/bin/python -m kit.cli compare runs/smollm2 $(DEMO_COMPARE)

serve: $(TRAIN_ENV) $(SERVE_ENV)
	$(VENV)/bin/python -m kit.cli serve $(RUN)

# make test: the two environments and the browser are set up side by side (the training one's llama.cpp build
# keeps both cores busy; the other downloads and unpacks meanwhile)
ifeq ($(MAKECMDGOALS),test)
MAKEFLAGS += -j3
endif
test: setup setup-browser
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/ruff check kit tests bench
	$(VENV)/bin/python -m pytest -q -rs --durations=30 tests

clean:
	rm -rf $(VENV) $(SERVE) runs
