# Two commands do everything on a fresh machine with Python 3.11+ and a C compiler:
#   make chat   set up .venv (first time: builds llama-cpp-python, ~10 min) and open the chat
#   make test   same set-up, then the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ember-installed
LLAMA_STAMP := $(VENV)/.llama-cpp-built
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36

# llama.cpp is built for this machine's CPU (GGML_NATIVE), but without AMX: llama.cpp's AMX extra buffer
# type segfaults on the first decode (ggml_backend_amx_mul_mat; Sapphire Rapids and later, common cloud
# Xeons). With -mno-amx-* the compiler never defines __AMX_INT8__, so ggml-cpu compiles the AMX path out
# and every other native feature (AVX2, AVX-512, VNNI) stays: measured in `ember bench engine`.
# A compiler that does not know the flags cannot emit AMX either, so they are added only where it does.
NO_AMX := $(shell echo | $${CC:-cc} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 -E - >/dev/null 2>&1 && echo "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")

.PHONY: setup chat test bench clean

setup: $(STAMP)

$(LLAMA_STAMP): Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Ember needs Python 3.11 or newer: make PYTHON=python3.11 ...")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# Built here, never from pip's wheel cache: a cached wheel may have been built with other flags.
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc 2>/dev/null || echo 2) CFLAGS="$(NO_AMX) $$CFLAGS" CXXFLAGS="$(NO_AMX) $$CXXFLAGS" \
		$(BIN)/python -m pip install --quiet --no-cache-dir --force-reinstall --no-deps '$(LLAMA_CPP_PYTHON)'
	touch $(LLAMA_STAMP)

$(STAMP): pyproject.toml $(LLAMA_STAMP)
	# torch first, pinned: an unpinned torch resolves to a build that pulls GBs of CUDA packages.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# The engine's self-check: one tiny decode in a child process; a native crash is one line, not a core dump.
	$(BIN)/ember doctor --self-check
	touch $(STAMP)

chat: setup
	$(BIN)/ember chat

# Household learning's tests run in a venv of their own, layered over Ember's: Flower 1.42 pins older
# protobuf, rich, typer and packaging than Ember's environment resolves to (rich draws the chat), so
# Flower and its pins go in .venv-federated and a .pth file adds .venv's packages after them.
FED_VENV := .venv-federated
FED_STAMP := $(FED_VENV)/.ember-installed
PURELIB := import sysconfig; print(sysconfig.get_paths()["purelib"])

$(FED_STAMP): pyproject.toml $(STAMP)
	test -x $(FED_VENV)/bin/python || $(BIN)/python -m venv $(FED_VENV)
	$(FED_VENV)/bin/python -m pip install --quiet 'flwr>=1.42,<1.43'
	$(BIN)/python -c '$(PURELIB)' > "$$($(FED_VENV)/bin/python -c '$(PURELIB)')/zz_ember_venv.pth"
	touch $(FED_STAMP)

test: setup $(FED_STAMP)
	$(BIN)/python -m pytest
	$(FED_VENV)/bin/python -m pytest tests/test_federated.py tests/test_federated_processes.py tests/test_federate_cli.py

bench: setup
	$(BIN)/ember bench engine

clean:
	rm -rf $(VENV) $(FED_VENV) build *.egg-info
