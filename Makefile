# dm_assets: `make demo` runs the main job end to end, `make test` runs every check CI runs.
# Both set up everything first (Debian packages, .venv, pinned dependencies) when needed.
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONDONTWRITEBYTECODE := 1
# The tests the other Python versions run (a pytest -m expression; empty: all). The slow ones
# are end-to-end runs through Dagster, MLflow, servers and a browser, whose Python code the fast
# tests also run, and whose 3.12 pass would take CI past its time budget.
OTHER_PYTHONS_MARK ?= not slow

.PHONY: setup demo demo-seed ui mlflow-ui test lint typecheck unit unit-pythons bench clean

setup:
	@scripts/setup.sh

demo: setup
	@PY=$(PY) scripts/demo.sh

demo-seed: setup
	@PY=$(PY) scripts/demo_seed.sh

ui: setup
	$(PY) -m dm_assets.ui dagster

mlflow-ui: setup
	$(PY) -m dm_assets.ui mlflow

# The suite runs on .venv's Python, then on every other version pyproject.toml's classifiers
# list that this machine has (scripts/test_pythons.sh: .venv312 for 3.12; one not found is
# reported, not a failure; DM_OTHER_PYTHONS=0 skips them).
test: setup lint typecheck unit unit-pythons

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck:
	$(VENV)/bin/mypy

unit:
	$(PY) -m pytest

unit-pythons:
	@VENV=$(VENV) PYTEST_MARK='$(OTHER_PYTHONS_MARK)' scripts/test_pythons.sh

bench: setup
	$(PY) benchmarks/store_bench.py
	$(PY) benchmarks/regression_bench.py
	$(PY) benchmarks/loader_bench.py
	$(PY) benchmarks/orchestration_bench.py
	$(PY) benchmarks/digits_lds.py
	$(PY) benchmarks/bootstrap_bench.py
	$(PY) benchmarks/fanout_bench.py
	$(PY) benchmarks/scale_bench.py

clean:
	rm -rf .dm .pytest_cache .mypy_cache .ruff_cache
