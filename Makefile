# Two commands from a clean clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NUM_SAMPLES ?= 30
ARGS ?=
# make test runs the suite in this many processes (pytest-xdist), one test module at a time each.
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: demo test test-fast lint install install-test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Stamp files: reinstall only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(PY) -m tune_rice.search --num-samples $(NUM_SAMPLES) $(ARGS)

test: install-test
	$(PY) -m pytest -q $(XDIST) $(ARGS)

test-fast: install-test
	$(PY) -m pytest -q -m "not slow" $(XDIST) $(ARGS)

# The linter, the formatter and the type checker, configured in pyproject.toml; CI runs this before the tests.
lint: install-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

bench: install
	$(PY) benchmarks/bench_search.py
	$(PY) benchmarks/bench_extract.py

clean:
	rm -rf runs .pytest_cache build *.egg-info
