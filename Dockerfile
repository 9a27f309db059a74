# syntax=docker/dockerfile:1
#
# cdlm images for NVIDIA A100 (sm_80) nodes. Two targets:
#   server (default, last stage)  docker build -t cdlm:server .
#   train                         docker build --target train -t cdlm:train .
#
# PyTorch comes from the PyTorch CUDA index, pinned. torch 2.13.0's CUDA 13.0 build needs an
# NVIDIA driver >= 580 on the host. For hosts with an older driver (535/550/570), build with a
# CUDA 12.8 wheel and base instead (if the pinned torch version publishes one):
#   docker build --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t cdlm:server .
# See docs/deploy.md for the `docker run` line, compose and Kubernetes.

ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# base: OS packages, a virtualenv, pinned torch with CUDA, the cdlm package (server + training)
# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS base

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# Distribution packages float with the base image's security updates on purpose (pinning
# Ubuntu package versions breaks the build whenever the archive moves on).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv "${VIRTUAL_ENV}"

# torch first, from the CUDA index, so the package's `torch>=2.4` is already satisfied and pip
# never swaps in another build.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

WORKDIR /opt/cdlm
COPY pyproject.toml README.md ./
COPY cdlm ./cdlm
RUN pip install --no-cache-dir . \
 && cdlm --help >/dev/null

# Unprivileged runtime user (uid 10001; Ubuntu 24.04 images already use 1000 for `ubuntu`).
# /data/hf is the Hugging Face cache (HF_HOME): mount a volume there so weights are downloaded
# once; /models is where a local checkpoint directory is mounted read-only.
RUN groupadd --system --gid 10001 cdlm \
 && useradd --system --uid 10001 --gid cdlm --home-dir /home/cdlm --create-home --shell /usr/sbin/nologin cdlm \
 && mkdir -p /data/hf /models \
 && chown -R cdlm:cdlm /data /models

# (DL3064 matches the TOKEN in TOKENIZERS_PARALLELISM: no secret here.)
# hadolint ignore=DL3064
ENV HF_HOME=/data/hf \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false

# ---------------------------------------------------------------------------------------------
# train: the offline pipeline (trajectory collection, distillation) under accelerate/torchrun.
#   docker run --gpus all --ipc=host -v cdlm-data:/data cdlm:train \
#     accelerate launch --config_file /opt/cdlm/deploy/training/accelerate_4gpu.yaml \
#       -m cdlm.training distill --base TEACHER --trajectories /data/traj --out /data/student
# ---------------------------------------------------------------------------------------------
FROM base AS train
COPY deploy/training /opt/cdlm/deploy/training
# The `train` extra: prompt sets from parquet, `datasets` directories and hub datasets.
RUN pip install --no-cache-dir "/opt/cdlm[train]"
USER 10001:10001
WORKDIR /home/cdlm
VOLUME ["/data"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "-m", "cdlm.training", "--help"]

# ---------------------------------------------------------------------------------------------
# server (default target): `cdlm serve`, OpenAI-compatible API + /health + /metrics on :8000.
# Configure with CDLM_* environment variables (docs/ARCHITECTURE.md), e.g.
#   CDLM_MODEL=/models/llada-cdlm  or  CDLM_MODEL=<hub id>   CDLM_LORA=<adapter dir or hub id>
# ---------------------------------------------------------------------------------------------
FROM base AS server
ENV CDLM_HOST=0.0.0.0 \
    CDLM_PORT=8000 \
    CDLM_DRAIN_TIMEOUT=30
USER 10001:10001
WORKDIR /home/cdlm
VOLUME ["/data/hf"]
EXPOSE 8000
# Loading an 8B checkpoint (and downloading it on first start) takes minutes: generous start
# period. /health is 503 while draining or when the engine loop died, so the check fails then.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('CDLM_PORT', '8000'), timeout=4)"]
# SIGTERM (docker stop, Kubernetes) starts the server's drain: stop admitting, finish in-flight
# requests for up to CDLM_DRAIN_TIMEOUT seconds, exit. Give `docker stop` more than that
# (`--stop-timeout 45`, compose `stop_grace_period`). tini forwards the signal and reaps.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "cdlm", "serve"]
CMD []
