# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; set TORCH_SPEC (e.g. "torch --index-url <cuda wheel index>") for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Extras of pyproject.toml to install; .ci/run adds 'cuda' (triton, ~1 GB) for the Triton kernel tests.
EXTRAS ?= dev
READY := $(BIN)/.ready-$(EXTRAS)

.PHONY: demo test lint bench clean

$(READY): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

demo: $(READY)
	$(BIN)/batchnorm demo

# The operators' composite path (plain torch ops on the reference kernels), and the Triton
# kernels under Triton's interpreter, each through the public layers (see tests/ops).
COMPOSITE_TESTS := tests/ops tests/core tests/modules tests/keras tests/test_functional.py

test: $(READY)
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q
	BATCHNORM_BACKEND=torch $(BIN)/python -m pytest -q $(COMPOSITE_TESTS)
	@if $(BIN)/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then \
		echo "GPU PRESENT: the Triton kernels ran on CUDA tensors in the first pass; no interpreter pass"; \
	elif $(BIN)/python -c "import triton" 2>/dev/null; then \
		BATCHNORM_BACKEND=triton $(BIN)/python -m pytest -q tests/ops/test_exactness.py; \
	elif [ "$$BATCHNORM_REQUIRE_TRITON" = 1 ]; then \
		echo "TRITON NOT INSTALLED: the Triton kernel tests are required here"; exit 1; \
	else \
		echo "TRITON NOT INSTALLED: skipping the Triton kernel tests (make EXTRAS=dev,cuda test)"; \
	fi

lint: $(READY)
	$(BIN)/ruff check src tests

bench: $(READY)
	$(BIN)/batchnorm bench

clean:
	rm -rf $(VENV) build src/*.egg-info
