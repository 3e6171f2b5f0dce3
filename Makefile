# Set-up is part of every target: a fresh clone needs nothing but Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
# torch first, pinned but overridable: an unpinned requirement would pull a multi-GB
# CUDA build where a CPU build is wanted (e.g. `make test TORCH_SPEC=torch`).
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/merge demo

bench: $(STAMP)
	$(BIN)/python benchmarks/merge_throughput.py

lint: $(STAMP)
	$(BIN)/ruff check mergekit_lite cli tests benchmarks
	$(BIN)/mypy mergekit_lite cli

clean:
	rm -rf $(VENV) .demo benchmarks/.work
