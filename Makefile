# `make demo` and `make test` set everything up on a fresh machine; a second run skips the install.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint format demo bench clean

LMEVAL := .venv-lmeval
LMEVAL_STAMP := $(LMEVAL)/.installed

# lm-evaluation-harness in a venv of its own, so that its `datasets` and friends never move our pins; the interop test
# and bench/bench_text_benchmark.py run it as a subprocess (docs/evaluation.md, "lm-evaluation-harness").
$(LMEVAL_STAMP):
	test -x $(LMEVAL)/bin/python || $(PYTHON) -m venv $(LMEVAL)
	$(LMEVAL)/bin/python -m pip install -q --upgrade pip
	$(LMEVAL)/bin/python -m pip install -q torch==2.13.0
	$(LMEVAL)/bin/python -m pip install -q 'lm_eval[hf]==0.4.13' 'transformers>=4.44,<6' 'tokenizers>=0.19,<1' 'safetensors>=0.4,<1'
	touch $(LMEVAL_STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is needed; set PYTHON=python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Pinned: this build is on the machine's disk (CPU); an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) $(LMEVAL_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The tests need lm-eval's venv too (the interop test); the demo does not.
test: lint $(LMEVAL_STAMP)
	$(BIN)/pytest -q --durations=25

demo: $(STAMP)
	$(BIN)/cham demo

clean:
	rm -rf data/demo .pytest_cache build *.egg-info
