# aiosync developer commands. Every target creates .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
BUILD_INPUTS := pyproject.toml $(wildcard setup.py) $(wildcard aiosync/*.c)

.PHONY: demo test lint check bench docs clean matrix

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

demo: $(VENV)/.installed
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

# Checks the docs against the code, then builds the site into site/ (--strict: a
# broken link, page or API reference fails).
docs: $(VENV)/.installed-test
	$(PY) docs/check.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) site build *.egg-info aiosync/*.so .mypy_cache .ruff_cache .pytest_cache .hypothesis
