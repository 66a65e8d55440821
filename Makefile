# The two commands of the README:
#   make demo   create .venv, install raypeft, run the embedded SFT demo
#   make test   create .venv, install raypeft with its test extras, run the whole test suite
#
# torch is installed first and on its own, because a bare `torch` requirement in a fresh venv
# pulls the multi-GB CUDA build. On a machine without nvidia-smi we install $(TORCH) (the CPU
# build where pip finds one, e.g. from --index-url https://download.pytorch.org/whl/cpu via
# TORCH_INDEX); on a GPU machine, install your CUDA build of torch into .venv first (see README).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)

.PHONY: install install-dev demo test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	@if [ -z "$(HAS_CUDA)" ] && ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  echo "installing the CPU build of torch ($(TORCH))"; \
	  $(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi
	@touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/raypeft run configs/quickstart.yaml

test: install-dev
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: install-dev
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf outputs mlartifacts mlflow.db .pytest_cache
