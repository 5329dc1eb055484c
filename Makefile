# Two entry points that do all set-up on a fresh machine:
#   make run   -> create .venv, install, train the class-conditioned VAE-GAN on the embedded phantoms
#   make test  -> create .venv, install, run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint install

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch from this machine's disk; a looser spec would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m pipeline.run train configs/phantoms64.yaml $(ARGS)

test: $(STAMP)
	# two workers (pytest-xdist): the suite is CPU-bound single-threaded work on a 2-core machine
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
