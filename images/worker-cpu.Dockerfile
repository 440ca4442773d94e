# syntax=docker/dockerfile:1
# The CPU worker image: `doppel scrape` and `doppel cleanup` in the operator's scrape and cleanup Jobs
# (no torch: small, quick to pull on any node). Train Jobs run worker.Dockerfile.
# Build from the repository root (`make images` does, with podman, buildah or docker):
#   docker build -f images/worker-cpu.Dockerfile -t ghcr.io/doppel-dev/doppel-worker-cpu:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY images/constraints.txt /src/images/constraints.txt
COPY pyproject.toml README.md /src/
COPY operator /src/operator
# A non-editable install into its own virtualenv, pinned to the versions the tests ran with.
RUN python -m venv /opt/doppel \
 && /opt/doppel/bin/pip install --constraint images/constraints.txt ".[slack]"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="doppel-worker-cpu" \
      org.opencontainers.image.description="doppel scrape and cleanup Jobs" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/doppel /opt/doppel
ENV PATH=/opt/doppel/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --gid 10001 doppel \
 && useradd --uid 10001 --gid 10001 --home-dir /home/doppel --create-home --shell /usr/sbin/nologin doppel
USER 10001:10001
WORKDIR /home/doppel
ENTRYPOINT ["doppel"]
CMD ["--help"]
