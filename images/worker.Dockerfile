# syntax=docker/dockerfile:1
# The train worker image: `doppel train` in the operator's train Jobs (the GPU ones). Scrape and cleanup
# Jobs run the small CPU image (worker-cpu.Dockerfile) instead.
# Same base and Python (3.11) as the other images and images/constraints.txt. torch is PyPI's default Linux
# build of the pinned version: torch 2.13 is built for CUDA 13 and brings the CUDA libraries as nvidia-*
# wheels, so the base needs no CUDA, only the GPU node's driver (580 or newer), which the NVIDIA container
# runtime mounts in. NVIDIA_REQUIRE_CUDA makes that runtime refuse an older driver with that reason instead
# of torch silently seeing no GPU; a train pod that asked for a GPU and sees none fails ("asked for a GPU
# but sees no CUDA device").
# TORCH_PIP_ARGS picks another torch build of the same version, e.g. the CPU one for CPU-only clusters:
#   --build-arg TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# Build from the repository root (`make images` does, with podman, buildah or docker):
#   docker build -f images/worker.Dockerfile -t ghcr.io/doppel-dev/doppel-worker:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE}
ARG TORCH_PIP_ARGS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY images/constraints.txt /src/images/constraints.txt
COPY pyproject.toml README.md /src/
COPY operator /src/operator
# A non-editable install into its own virtualenv, pinned to the versions the tests ran with.
RUN python -m venv /opt/doppel \
 && if [ -n "$TORCH_PIP_ARGS" ]; then \
      /opt/doppel/bin/pip install --constraint images/constraints.txt $TORCH_PIP_ARGS torch; fi \
 && /opt/doppel/bin/pip install --constraint images/constraints.txt ".[slack,train]" \
 && rm -rf /src
LABEL org.opencontainers.image.title="doppel-worker" \
      org.opencontainers.image.description="doppel train Jobs (torch, CUDA 13 from its wheels)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/doppel/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0"
RUN groupadd --gid 10001 doppel \
 && useradd --uid 10001 --gid 10001 --home-dir /home/doppel --create-home --shell /usr/sbin/nologin doppel
USER 10001:10001
WORKDIR /home/doppel
ENTRYPOINT ["doppel"]
CMD ["--help"]
