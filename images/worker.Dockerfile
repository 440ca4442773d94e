# syntax=docker/dockerfile:1
# The worker image: `doppel scrape` and `doppel train` in the Jobs the operator starts (train needs a GPU).
# torch is PyPI's default Linux build of the version the tests' CPU build has (images/constraints.txt):
# torch 2.13 is built for CUDA 13 and brings its CUDA libraries as nvidia-* wheels, so the base image
# only has to match that CUDA version. The GPU nodes need an NVIDIA driver for CUDA 13: 580 or newer.
# NVIDIA_REQUIRE_CUDA (set by the base image) makes the NVIDIA container runtime refuse to start the
# container on an older driver, with that reason, instead of torch silently seeing no GPU; a train pod
# that asked for a GPU and still sees none fails ("asked for a GPU but sees no CUDA device").
# Build from the repository root:
#   docker build -f images/worker.Dockerfile -t ghcr.io/doppel-dev/doppel-worker:0.1.0 .
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY images/constraints.txt /src/images/constraints.txt
COPY pyproject.toml README.md /src/
COPY operator /src/operator
# A non-editable install into its own virtualenv, pinned to the versions the tests ran with.
RUN python3 -m venv /opt/doppel \
 && /opt/doppel/bin/pip install --constraint images/constraints.txt ".[slack,train]" \
 && rm -rf /src
LABEL org.opencontainers.image.title="doppel-worker" \
      org.opencontainers.image.description="doppel scrape and train Jobs (CUDA)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/doppel/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN groupadd --gid 10001 doppel \
 && useradd --uid 10001 --gid 10001 --home-dir /home/doppel --create-home --shell /usr/sbin/nologin doppel
USER 10001:10001
WORKDIR /home/doppel
ENTRYPOINT ["doppel"]
CMD ["--help"]
