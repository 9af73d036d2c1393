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

test: $(READY)
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q

lint: $(READY)
	$(BIN)/ruff check src tests

bench: $(READY)
	$(BIN)/batchnorm bench

clean:
	rm -rf $(VENV) build src/*.egg-info
