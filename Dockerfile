# syntax=docker/dockerfile:1
# The server on NVIDIA GPUs: DeepSpeed tensor-parallel inference behind bloom-server's HTTP API. Build from the repo root:
#   docker build -t REGISTRY/bloom-server:0.1.0 .
#
# CUDA 13.0 devel base: torch 2.13.0's wheel on PyPI is built for CUDA 13.0 (it pulls cuda-toolkit 13.0 and cuDNN 9
# wheels), and nvcc of the same major version compiles DeepSpeed's inference kernels below. GPU nodes need an NVIDIA
# driver that supports CUDA 13.0 (>= 580). Ubuntu 24.04 brings Python 3.12.
FROM nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu's own packages, at the versions of the pinned base image (apt cannot pin across security updates).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev libaio-dev \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv \
    && pip install "pip==26.3" "setuptools==84.2.1" "wheel==0.48.0" "ninja==1.13.2" "packaging==26.3"

RUN pip install "torch==2.13.0" "numpy==2.4.6"

# DeepSpeed with its fused inference op (transformer_inference: BLOOM kernel injection) compiled now, for A100 (8.0)
# and H100/H200 (9.0), so pods never compile at start. No GPU is present at build: DS_ACCELERATOR says which ops to
# build; the check fails the build if the op did not compile.
ENV TORCH_CUDA_ARCH_LIST="8.0;9.0"
RUN DS_ACCELERATOR=cuda DS_BUILD_OPS=0 DS_BUILD_TRANSFORMER_INFERENCE=1 MAX_JOBS=8 \
    pip install --no-build-isolation --no-binary deepspeed \
        "deepspeed==0.19.8" "hjson==3.1.0" "einops==0.8.2" "msgpack==1.2.4" "py-cpuinfo==9.0.0" "psutil==7.2.2" \
    && python -c "from deepspeed.git_version_info import installed_ops as o; assert o['transformer_inference'], o"

# The server's dependencies, pinned (pyproject.toml gives the ranges; tests/test_dockerfiles.py checks these pins
# satisfy them).
RUN pip install \
        "transformers==4.43.4" \
        "tokenizers==0.19.1" \
        "huggingface-hub==0.36.2" \
        "accelerate==1.15.0" \
        "safetensors==0.8.0" \
        "fastapi==0.165.0" \
        "uvicorn==0.54.0" \
        "pydantic==2.14.3" \
        "pydantic-settings==2.16.3" \
        "prometheus-client==0.26.0" \
        "jinja2==3.1.6" \
        "fastapi-offline==1.7.7" \
        "llguidance==1.9.1"

COPY pyproject.toml /src/
COPY src/ /src/src/
RUN pip install --no-deps /src && rm -rf /src

RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin bloom
USER 10001:10001
WORKDIR /home/bloom
# Writable places under a read-only root filesystem: the manifests mount an emptyDir at /tmp.
ENV HOME=/home/bloom \
    HF_HOME=/tmp/hf \
    HF_HUB_OFFLINE=1 \
    TRITON_CACHE_DIR=/tmp/triton \
    TORCH_EXTENSIONS_DIR=/tmp/torch_extensions \
    BLOOM_PORT=8080

EXPOSE 8080
# Kubernetes uses the manifests' probes; this serves `docker run`. /health is 200 from process start.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]
# `bloom-server launch` execs `deepspeed --num_gpus $BLOOM_NUM_GPUS --module bloom_server serve`
# (BLOOM_NUM_GPUS defaults to every visible GPU; the manifests set it to the nvidia.com/gpu limit).
ENTRYPOINT ["bloom-server", "launch"]
