# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean

venv: $(STAMP)

# torch goes in first, pinned to the CPU build; the project's own range then installs nothing more.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,ray,text]'
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

demo: venv
	$(BIN)/quantlens demo

# the import contracts in pyproject.toml first: a layer that imports one above it fails the build
test: venv
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python benchmarks/sweep.py

clean:
	rm -rf $(VENV) runs .pytest_cache
