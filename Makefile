# Two commands do everything on a fresh machine with Python 3.11+ and a C compiler:
#   make chat   set up .venv (first time: builds llama-cpp-python, ~10 min) and open the chat
#   make test   same set-up, then the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ember-installed

.PHONY: setup chat test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Ember needs Python 3.11 or newer: make PYTHON=python3.11 ...")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch resolves to a build that pulls GBs of CUDA packages.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc 2>/dev/null || echo 2) $(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

chat: setup
	$(BIN)/ember chat

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/ember bench engine

clean:
	rm -rf $(VENV) build *.egg-info
