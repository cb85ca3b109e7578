# aiosync developer commands. Every target creates .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
BUILD_INPUTS := pyproject.toml $(wildcard setup.py) $(wildcard aiosync/*.c)

.PHONY: demo test lint check bench docs wheel clean matrix

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The package alone (what a user installs).
$(VENV)/.installed: $(PY) $(BUILD_INPUTS)
	$(PY) -m pip install --quiet -e .
	touch $@

# The package with its test and docs extras (pytest, uvloop, hypothesis, mypy, ruff,
# mkdocs).
$(VENV)/.installed-test: $(PY) $(BUILD_INPUTS)
	$(PY) -m pip install --quiet -e '.[test,docs]'
	touch $@ $(VENV)/.installed

# Everything, plus matplotlib for the benchmark chart.
$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(PY) -m pip install --quiet -e '.[test,docs,bench]'
	touch $@

# The package with its demo extra (uvloop: every example also runs with --loop uvloop).
$(VENV)/.installed-demo: $(PY) $(BUILD_INPUTS)
	$(PY) -m pip install --quiet -e '.[demo]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed-demo
	$(PY) examples/prefork_server.py

lint: $(VENV)/.installed-test
	$(BIN)/ruff check aiosync tests examples benchmarks docs/check.py docs/hooks.py
	$(BIN)/ruff format --check aiosync tests examples benchmarks docs/check.py docs/hooks.py
	$(BIN)/mypy

test: lint docs
	$(BIN)/pytest

# The suite (plain pytest, no lint or docs) on every supported interpreter found: pyenv's,
# the system's, python3.X on PATH, the Debian root's (docs/contributing.md), or exactly
# those in MATRIX_PYTHONS. One venv each (.venv-<origin>-<X.Y>), one line each.
matrix:
	$(PYTHON) tests/support/matrix.py

bench: $(VENV)/.installed-bench
	$(PY) -m benchmarks

# A wheel for users without a compiler: built here, then repaired by auditwheel into a
# manylinux wheel (it links nothing but libc) in dist/. Release wheels for every
# interpreter and architecture: cibuildwheel, configured in pyproject.toml.
$(VENV)/.installed-wheel: $(PY) $(BUILD_INPUTS)
	$(PY) -m pip install --quiet -e '.[wheel]'
	touch $@ $(VENV)/.installed

wheel: $(VENV)/.installed-wheel
	rm -rf build dist/raw
	$(PY) -m pip wheel --quiet --no-deps --wheel-dir dist/raw .
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/auditwheel repair --wheel-dir dist dist/raw/aiosync-*.whl
	rm -rf dist/raw

# Checks the docs against the code, then builds the site into site/ (--strict: a
# broken link, page or API reference fails).
docs: $(VENV)/.installed-test
	$(PY) docs/check.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) site build dist *.egg-info aiosync/*.so .mypy_cache .ruff_cache .pytest_cache .hypothesis
