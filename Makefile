# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; set TORCH_SPEC (e.g. "torch --index-url <cuda wheel index>") for a CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint bench clean

$(BIN)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/.ready
	$(BIN)/batchnorm demo

test: $(BIN)/.ready
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q

lint: $(BIN)/.ready
	$(BIN)/ruff check src tests

bench: $(BIN)/.ready
	$(BIN)/batchnorm bench

clean:
	rm -rf $(VENV) build src/*.egg-info
