# Two entry points that do all set-up on a fresh machine:
#   make run   -> create .venv, install, train the class-conditioned VAE-GAN on the embedded phantoms
#   make test  -> create .venv, install, run the test suite
#   make docs  -> build the manual (docs/, mkdocs.yml) strictly into $(SITE), outside the repository
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SITE ?= /tmp/cxr-site
STAMP := $(VENV)/.installed

.PHONY: run test lint install docs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch from this machine's disk; a looser spec would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m pipeline.run train $(ARGS)

test: $(STAMP)
	# two workers (pytest-xdist): the suite is CPU-bound single-threaded work on a 2-core machine
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

docs: $(STAMP)
	# strict: a broken link or anchor, or a page in docs/ missing from mkdocs.yml's nav, fails the build.
	# Not -q: mkdocs 1.6 then drops the warnings before strict mode counts them, and passes.
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d $(SITE)
