# `make demo` and `make test` work from a fresh clone: they create .venv and install the pinned set
# (constraints.txt) once; the stamp file is rebuilt only when pyproject.toml or constraints.txt change.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export PYTHONUNBUFFERED := 1

.PHONY: install demo lint test test-slow test-unit test-integration bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[test]'
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	rm -rf demo-out
	$(VENV)/bin/mvit demo --workdir demo-out

lint: $(STAMP)  ## ruff (pyproject [tool.ruff]) and the layering contract (pyproject [tool.importlinter])
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow" tests

test-slow: $(STAMP)  ## the acceptance runs too long for `make test` (see README, "Recipes")
	$(PY) -m pytest -q -ra -m slow tests

test-unit: $(STAMP)
	$(PY) -m pytest -q -ra tests/unit

test-integration: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow" tests/integration

bench: $(STAMP)  ## BENCH=model runs one benchmark only
	$(PY) benchmarks/run_all.py $(BENCH)

clean:
	rm -rf demo-out bench-out .state .pytest_cache
