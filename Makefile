# dm_assets: `make demo` runs the main job end to end, `make test` runs every check CI runs.
# Both set up everything first (Debian packages, .venv, pinned dependencies) when needed.
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup demo demo-seed ui mlflow-ui test lint typecheck unit bench clean

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

test: setup lint typecheck unit

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck:
	$(VENV)/bin/mypy

unit:
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/store_bench.py
	$(PY) benchmarks/regression_bench.py
	$(PY) benchmarks/loader_bench.py
	$(PY) benchmarks/orchestration_bench.py
	$(PY) benchmarks/digits_lds.py
	$(PY) benchmarks/fanout_bench.py
	$(PY) benchmarks/scale_bench.py

clean:
	rm -rf .dm .pytest_cache .mypy_cache .ruff_cache
