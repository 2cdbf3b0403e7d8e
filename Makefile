# Two commands do all the set-up on a fresh machine:
#   make run    builds .venv and runs the main job (`crosscheck` on the seed sentence)
#   make test   builds .venv (and .venv-ttnn with the real ttnn), lints and type-checks, builds the docs site
#               (strict), runs every test and checks the built wheel in a clean environment
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TTNN_VENV ?= .venv-ttnn
PIP_FLAGS ?= -q --disable-pip-version-check

# CPython 3.12 is the only interpreter both pins fit: ttnn 0.81.1 ships cp310 and cp312 wheels (numpy<2),
# JAX 0.7.0 needs Python >= 3.11. JAX 0.7.0 is the oldest JAX
# jaxattn supports; flax 0.11.2 is the newest Flax whose own requirement (jax>=0.6.0) admits it
# (flax 0.12.0 needs jax>=0.7.1). jaxtyping provides the pytest plugin pyproject's addopts name. torch is
# never installed here: PyPI's wheel would pull GBs of CUDA libraries, and the worker needs none of it.
TTNN_REQUIREMENTS = ttnn==0.81.1 'numpy<2' jax==0.7.0 jaxlib==0.7.0 flax==0.11.2 \
	pytest pytest-xdist hypothesis jaxtyping==0.3.11 beartype==0.23.1 safetensors ml_dtypes rich

# Base interpreter for $(TTNN_VENV): pyenv's 3.12.1 if pyenv has it, else python3.12 on PATH (a pyenv shim
# that does not resolve fails `-c pass` and is skipped). Empty when there is none.
TTNN_BASE_PYTHON ?= $(shell \
	if PYENV_VERSION=3.12.1 pyenv which python >/dev/null 2>&1; then PYENV_VERSION=3.12.1 pyenv which python; \
	elif python3.12 -c pass >/dev/null 2>&1; then python3.12 -c 'import sys; print(sys.executable)'; fi)

.PHONY: run test lint docs test-main test-xla-optimized test-oldest-and-package test-conformance test-package venv venv-ttnn clean

venv: $(VENV)/.installed

# torch==2.13.0 comes from constraints.txt: the local CPU build, never CUDA wheels.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -c constraints.txt -e '.[crosscheck,test,bench,hf,plot,docs,equinox]'
	touch $@

venv-ttnn: $(TTNN_VENV)/.installed

# Without a Python 3.12 no stamp is written, and `test-conformance` reports the skip.
$(TTNN_VENV)/.installed: pyproject.toml Makefile
	@if [ -z "$(TTNN_BASE_PYTHON)" ]; then \
	  echo "no Python 3.12 found (pyenv 3.12.1, python3.12): not building $(TTNN_VENV)"; \
	else \
	  set -e; \
	  echo "building $(TTNN_VENV) with $(TTNN_BASE_PYTHON)"; \
	  "$(TTNN_BASE_PYTHON)" -m venv $(TTNN_VENV); \
	  $(TTNN_VENV)/bin/pip install $(PIP_FLAGS) $(TTNN_REQUIREMENTS); \
	  $(TTNN_VENV)/bin/pip install $(PIP_FLAGS) --no-deps -e .; \
	  touch $@; \
	fi

run: $(VENV)/.installed
	$(VENV)/bin/crosscheck

# Lint and types beside the docs site, failing fast; then the three test parts always run, and the target
# fails if any did.
# Each part prints its wall time (`time`), so a slow part shows in CI's log.
test: $(VENV)/.installed $(TTNN_VENV)/.installed
	@$(MAKE) --no-print-directory -j2 --output-sync=target lint docs
	@status=0; \
	$(MAKE) --no-print-directory test-main || status=1; \
	$(MAKE) --no-print-directory -k -j2 --output-sync=target test-xla-optimized test-oldest-and-package || status=1; \
	exit $$status

# The three single-process parts share the two cores: the XLA-optimised rerun beside the oldest stack and
# then the package (each part's output is printed whole when it ends: --output-sync).
test-oldest-and-package:
	@status=0; \
	$(MAKE) --no-print-directory test-conformance || status=1; \
	$(MAKE) --no-print-directory test-package || status=1; \
	exit $$status

# ruff (lint and the formatter's check) and mypy, configured in pyproject.toml.
LINT_PATHS = jaxattn crosscheck tools
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

# The documentation site (mkdocs.yml, docs/): --strict turns every warning (a broken link, a docstring the API
# reference cannot parse) into a failure. The site goes to $(SITE_DIR), ignored by git.
SITE_DIR ?= site
docs: $(VENV)/.installed
	time NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir $(SITE_DIR)

# pytest-xdist: TEST_WORKERS processes share the tests (2: this project's 2-core CI machine).
# `make test TEST_WORKERS=0` runs in one process.
TEST_WORKERS ?= 2

# tests/conftest.py compiles at XLA's backend optimisation level 0 with XLA:CPU's older emitters (40 % of
# level 0's compile time alone). The tests of non-finite numerics (marker xla_optimized), where optimised code has
# shown bugs, run instead at XLA's default, as users compile: in test-xla-optimized, in one process beside
# the oldest stack. Each test runs once in `make test`; a plain `pytest` runs them all at level 0.
test-main: $(VENV)/.installed
	time $(VENV)/bin/python -m pytest --ignore=tests/conformance -m "not xla_optimized" -n $(TEST_WORKERS)

# Only the files that carry the marker are collected (collecting all of tests/ takes a worker 10 s).
XLA_OPTIMIZED_FILES = $(shell grep -rl --include='test_*.py' --exclude-dir=conformance 'mark.xla_optimized' tests)
test-xla-optimized: $(VENV)/.installed
	time JAXATTN_TEST_XLA_OPTIMIZED=1 $(VENV)/bin/python -m pytest -m xla_optimized -p no:xdist $(XLA_OPTIMIZED_FILES)

# tests/conformance runs only in $(TTNN_VENV) (real ttnn 0.81.1, JAX 0.7.0 + Flax 0.11.2, numpy<2): the main
# session ignores it. Its test_jax_minimum*.py files keep jaxattn working on the oldest JAX it supports, every
# public function once (the whole jaxattn tree runs in the main session). That interpreter is the ttnn
# worker's: no torch, so CROSSCHECK_WORKER=1 (crosscheck.extra) lets the torch-free parts of crosscheck import.
# pyproject addopts apply (jaxtyping's pytest plugin is installed in $(TTNN_VENV)). One process: two workers would each
# compile the shared programs again (measured slower).
test-conformance: $(TTNN_VENV)/.installed
	@if [ -f $(TTNN_VENV)/.installed ]; then \
	  set -x; time CROSSCHECK_WORKER=1 $(TTNN_VENV)/bin/python -m pytest tests/conformance; \
	else \
	  echo "SKIPPED tests/conformance: no Python 3.12 to build $(TTNN_VENV) (ttnn 0.81.1 + JAX 0.7.0 need it)"; \
	fi

# The built wheel and sdist, installed as the two audiences install them (tools/package_check.sh): jaxattn
# alone without torch, then the [crosscheck] extra, not editable, running `crosscheck` on its default input.
PACKAGE_CHECK_DIR ?= .package-check
test-package: $(VENV)/.installed
	time tools/package_check.sh $(abspath $(VENV))/bin/python $(PACKAGE_CHECK_DIR)

clean:
	rm -rf $(VENV) $(TTNN_VENV) $(PACKAGE_CHECK_DIR) $(SITE_DIR) .pytest_cache .hypothesis
