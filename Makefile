# Two commands do all the set-up on a fresh machine:
#   make run    builds .venv and runs the main job (`crosscheck` on the seed sentence)
#   make test   builds .venv (and .venv-ttnn with the real ttnn) and runs every test
PYTHON ?= python3
VENV ?= .venv
PIP_FLAGS ?= -q --disable-pip-version-check

.PHONY: run test venv clean

venv: $(VENV)/.installed

# torch==2.13.0 comes from constraints.txt: the local CPU build, never CUDA wheels.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -c constraints.txt -e '.[test,bench]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/crosscheck

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) .venv-ttnn .pytest_cache .hypothesis
