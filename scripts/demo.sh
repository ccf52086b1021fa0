#!/usr/bin/env bash
# The main job: datamodels of real data, end to end through Dagster, on the embedded defaults
# (a SQLite Dagster instance in $DM_HOME/dagster, MLflow in $DM_HOME/mlflow.db).
# The digits experiment (dm_assets/experiments/digits.yaml): 5,000 logistic-regression models,
# each trained on a random half of 1,000 scikit-learn digits, their correct-class margins on 797
# target digits; the store, every training partition, the FFCV dataset, the datamodels and their
# held-out evaluation (LDS), launched with `dagster job launch` and followed until the run ends.
# Ends by printing where the results are, the LDS, and how to open the UIs.
# Rerunning trains nothing already trained and makes a new fit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export DM_HOME=${DM_HOME:-$PWD/.dm}
EXPERIMENT=${EXPERIMENT:-digits}

echo "== $EXPERIMENT: store, training partitions, dataset, datamodels, evaluation (Dagster job ${EXPERIMENT}_all) =="
"$PY" -m dm_assets.launch "${EXPERIMENT}_all"
echo
"$PY" -m dm_assets.summary "$EXPERIMENT"
