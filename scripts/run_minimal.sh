#!/usr/bin/env bash
# The seed's minimal example end to end through the command lines: initialize a store, train its
# 10 models in two worker processes at once, check every row as the seed's check does.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DM_HOME=${DM_HOME:-.dm}
store="$DM_HOME/minimal/store"
spec=dm_assets/examples/minimal/spec.json
script=dm_assets.examples.minimal.train_minimal

"$PY" -m dm_assets.initialize_store --logging.logdir="$store" --logging.spec="$spec"
pids=()
for indices in 0-4 5-9; do
  "$PY" -m dm_assets.worker --worker.indices="$indices" --worker.main_import="$script" \
    --worker.logdir="$store" --worker.job_timeout=300 --trainer.multiple=2 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
[ "$status" -eq 0 ] || { echo "run_minimal: a worker failed (exit $status)" >&2; exit "$status"; }
"$PY" -m dm_assets.examples.minimal.check --checking.logdir="$store" --trainer.multiple=2
"$PY" -m dm_assets.status --logging.logdir="$store"
echo "run_minimal: store at $store (arrays: random_numbers.npy, _completed.npy; spec.json)"
