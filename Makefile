# space-worker: `make test` and `make demo` install what they need into .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
# CPU hosts take the local torch 2.13.0 CPU wheel; GPU hosts: see README ("GPU hosts").
CONSTRAINTS ?= constraints/cpu.txt
PYTEST_ARGS ?=

.PHONY: install test test-slow lint typecheck format demo bench clean

$(STAMP): pyproject.toml $(CONSTRAINTS) constraints/runtime.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c $(CONSTRAINTS) -c constraints/runtime.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m "slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m worker demo $(DEMO_ARGS)

# The host ceiling (bench/host.py, a few minutes): worker processes on a stand-in device; see docs/performance.md.
BENCH_ARGS ?= --images 4000 --processes 1,2 --heatmaps none,all
bench: $(STAMP)
	$(PY) bench/host.py $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check worker models schemas tests bench
	$(VENV)/bin/ruff format --check worker models schemas
	$(VENV)/bin/mypy worker models schemas

typecheck: $(STAMP)
	$(VENV)/bin/mypy worker models schemas

format: $(STAMP)
	$(VENV)/bin/ruff format worker models schemas tests bench
	$(VENV)/bin/ruff check --fix worker models schemas tests bench

# Stop an embedded stack first: once .space is gone, nothing records the broker's and Redis' pids.
clean:
	-test -x $(PY) && $(PY) -m worker stack down
	rm -rf .space .pytest_cache .mypy_cache .ruff_cache
