#!/usr/bin/env bash
# The seed's pipeline end to end through its command lines, without Dagster (`make demo-seed`):
#  1. the seed's minimal example: initialize a store, train its 10 models in two worker
#     processes at once, check every row as the seed's check does;
#  2. the synthetic example (a planted sparse datamodel, so the answer is known): a store of
#     1,500 models, the FFCV dataset, and the datamodels fitted and checked against the truth.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DM_HOME=${DM_HOME:-.dm}

echo "== minimal example =="
store="$DM_HOME/minimal/store"
"$PY" -m dm_assets.initialize_store --logging.logdir="$store" \
  --logging.spec=dm_assets/examples/minimal/spec.json
pids=()
for indices in 0-4 5-9; do
  "$PY" -m dm_assets.worker --worker.indices="$indices" \
    --worker.main_import=dm_assets.examples.minimal.train_minimal \
    --worker.logdir="$store" --worker.job_timeout=300 --trainer.multiple=2 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
[ "$status" -eq 0 ] || { echo "demo: a worker failed (exit $status)" >&2; exit "$status"; }
"$PY" -m dm_assets.examples.minimal.check --checking.logdir="$store" --trainer.multiple=2
"$PY" -m dm_assets.status --logging.logdir="$store"

echo "== synthetic example: train, write the dataset, fit the datamodels =="
example=dm_assets/examples/synthetic
root="$DM_HOME/synthetic"
"$PY" -m dm_assets.initialize_store --logging.logdir="$root/store" --logging.spec="$example/spec.json"
"$PY" -m dm_assets.worker --worker.indices=0-1499 --worker.logdir="$root/store" \
  --worker.main_import=dm_assets.examples.synthetic.train_synthetic 2>"$root/worker.log" \
  || { tail -20 "$root/worker.log" >&2; exit 1; }
"$PY" -m dm_assets.status --logging.logdir="$root/store"
rm -rf "$root/data.beton" "$root/datamodels"   # a rerun refits from the store
"$PY" -m dm_assets.regression.write_dataset --cfg.data_dir="$root/store" \
  --cfg.out_path="$root/data.beton" --cfg.x_name=masks --cfg.y_name=margins
"$PY" -m dm_assets.regression.compute_datamodels -C "$example/regression_config.yaml" \
  --data.data_path="$root/data.beton" --cfg.out_dir="$root/datamodels"
"$PY" -m dm_assets.examples.synthetic.check --datamodels="$root/datamodels" --store="$root/store"
echo "demo: stores, dataset and datamodels under $DM_HOME/ (datamodels: $root/datamodels)"
