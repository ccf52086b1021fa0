#!/usr/bin/env bash
# The main job: every stage of the asset graph through Dagster (`dagster job launch`, followed
# until the run ends), on the embedded defaults: SQLite-backed Dagster in $DM_HOME/dagster and
# MLflow in $DM_HOME/mlflow.db.
#  1. minimal: 300 planted-datamodel models in 6 partitions, dataset, datamodels (seconds);
#  2. synthetic: 1,500 of them, then the fit checked against the planted weights and on the
#     300 held-out models.
# Rerunning trains nothing already trained and makes a new fit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export DM_HOME=${DM_HOME:-$PWD/.dm}

for experiment in minimal synthetic; do
  echo "== $experiment: store, training partitions, dataset, datamodels (Dagster job ${experiment}_all) =="
  "$PY" -m dm_assets.launch "${experiment}_all"
done
"$PY" -m dm_assets.examples.synthetic.check --datamodels="$DM_HOME/synthetic/datamodels" \
  --store="$DM_HOME/synthetic/store"
"$PY" -m dm_assets.summary minimal synthetic
