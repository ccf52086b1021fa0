#!/usr/bin/env bash
# The GPU check (issue 12, part 4): one command on a machine with an NVIDIA GPU, under 8 minutes.
#
#   benchmarks/gpu_check.sh
#
# Parts, each under its own time limit (seconds; set the variable to change it):
#   1. the GPU: nvidia-smi's name, driver and memory (no GPU: exit 2 at once)
#   2. pytest -m cuda, the CUDA-marked tests                          CUDA_TESTS_SECONDS=90
#   3. CIFAR-10 seconds per model: python -m dm_assets.examples.cifar10.gpu_check where FFCV
#      imports, else benchmarks/cifar_memory_bench.py (the same training code, images held
#      on the GPU: a floor for the pipeline's seconds)                 CIFAR_SECONDS=150
#      (CIFAR_LOADER=ffcv or memory picks one instead)
#   4. the regression at the paper's CIFAR-10 shape, measured in parts and projected:
#      benchmarks/paper_scale_bench.py (its docstring says what and how)  REGRESSION_SECONDS=220
# Results: under $OUT when set (the device tool's folder), else the JSONs in benchmarks/results/
# (gpu_check.json, paper_scale_cuda.json, cifar10_gpu.json) and the logs in a temporary folder.
# gpu_check.json lists each part's status (passed, failed, timed out, not run and why).
#
# Python: $PY when set; else .venv/bin/python when it imports torch with CUDA; else python3
# (a GPU image's, which holds torch). Wheels in .wheels/ (pure-Python dependencies that image
# lacks, e.g. dagster for the tests' helpers) are installed into a temporary folder first.
# GPU_CHECK_TINY=1 runs the same script on the CPU at tiny sizes, without part 2 (the tests).
#
# Exit status: 0 when every part passed, 1 when any failed, timed out or could not run, 2 when
# there is no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
TINY=${GPU_CHECK_TINY:-0}
CUDA_TESTS_SECONDS=${CUDA_TESTS_SECONDS:-90}
CIFAR_SECONDS=${CIFAR_SECONDS:-150}
REGRESSION_SECONDS=${REGRESSION_SECONDS:-220}
if [ -n "${OUT:-}" ]; then
  RESULTS=$OUT LOGS=$OUT
else
  RESULTS=$REPO/benchmarks/results LOGS=$(mktemp -d -t gpu_check.XXXXXX)
fi
mkdir -p "$RESULTS" "$LOGS"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# fit_gram's float64 statistics at 50,000 examples take ~130 GiB at their peak: no fragments
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
started=$(date +%s)
parts=()  # one JSON object per part

record() {  # name status seconds detail
  local detail=${4//\\/\\\\}
  detail=${detail//\"/\\\"}
  parts+=("{\"part\": \"$1\", \"status\": \"$2\", \"seconds\": $3, \"detail\": \"$detail\"}")
  echo "gpu_check: $1: $2 ($3 s) $4" >&2
}

run_part() {  # name limit log command...: runs it under its time limit, records the outcome
  local name=$1 limit=$2 log=$3 t0 rc status
  shift 3
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" >"$log" 2>&1
  rc=$?
  case $rc in
    0) status=passed ;;
    124 | 137) status=timed_out ;;
    *) status=failed ;;
  esac
  record "$name" "$status" $(($(date +%s) - t0)) "exit $rc; log $(basename "$log")"
}

# 1. the GPU
gpu="cpu (tiny mode)"
if [ "$TINY" != 1 ]; then
  if ! gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1); then
    echo "gpu_check: nvidia-smi found no GPU: $gpu" >&2
    exit 2
  fi
fi
record gpu passed 0 "$gpu"

# the Python
if [ -z "${PY:-}" ]; then
  PY=python3
  if [ -x .venv/bin/python ] &&
    .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    PY=.venv/bin/python
  fi
fi
if [ -d .wheels ] && ls .wheels/*.whl >/dev/null 2>&1; then
  site=$(mktemp -d -t gpu_check_site.XXXXXX)
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" .wheels/*.whl \
    >"$LOGS/wheels.log" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$site"
  else
    record wheels failed 0 "pip could not install .wheels/ (log wheels.log)"
  fi
fi
if ! version=$("$PY" -c 'import sys, numpy, torch; print(sys.version.split()[0], "torch", torch.__version__)' 2>&1); then
  record python failed 0 "$PY cannot import torch and numpy: set PY to a Python that can"
else
  record python passed 0 "$PY: $version"

  # 2. the CUDA-marked tests
  if [ "$TINY" != 1 ]; then
    run_part cuda_tests "$CUDA_TESTS_SECONDS" "$LOGS/cuda_tests.log" \
      "$PY" -m pytest -m cuda -q -rA -p no:cacheprovider --continue-on-collection-errors \
      --junitxml="$LOGS/cuda_tests.xml" dm_assets_tests
  fi

  # 3. CIFAR-10 seconds per model
  if [ "$TINY" = 1 ]; then
    cifar_args=(--tiny --models 1)
  else
    cifar_args=(--models 3)
  fi
  loader=${CIFAR_LOADER:-auto}  # auto, ffcv or memory
  if [ "$loader" = auto ] && "$PY" -c "import ffcv, fastargs" >/dev/null 2>&1; then
    loader=ffcv
  fi
  if [ "$loader" = ffcv ]; then
    run_part cifar10_ffcv "$CIFAR_SECONDS" "$LOGS/cifar10.log" \
      "$PY" -m dm_assets.examples.cifar10.gpu_check "${cifar_args[@]}" --worker-models 1 \
      --json "$RESULTS/cifar10_gpu.json"
  else
    run_part cifar10_gpu_resident "$CIFAR_SECONDS" "$LOGS/cifar10.log" \
      "$PY" benchmarks/cifar_memory_bench.py "${cifar_args[@]}" --out "$RESULTS/cifar10_gpu.json"
  fi

  # 4. the paper-scale regression (its own budget ends a minute before the hard limit)
  if [ "$TINY" = 1 ]; then
    regression_args=(--tiny --device cpu --out "$RESULTS/paper_scale_tiny.json")
  else
    regression_args=(--device cuda --out "$RESULTS/paper_scale_cuda.json")
  fi
  run_part paper_scale "$REGRESSION_SECONDS" "$LOGS/paper_scale.log" \
    "$PY" benchmarks/paper_scale_bench.py "${regression_args[@]}" \
    --budget-seconds $((REGRESSION_SECONDS - 60))
fi

status=0
for part in "${parts[@]}"; do
  case $part in *'"status": "passed"'*) ;; *) status=1 ;; esac
done
{
  echo "{\"seconds\": $(($(date +%s) - started)), \"exit_status\": $status, \"logs\": \"$LOGS\","
  echo " \"parts\": ["
  for i in "${!parts[@]}"; do
    sep=,
    [ "$i" -eq $((${#parts[@]} - 1)) ] && sep=
    echo "  ${parts[$i]}$sep"
  done
  echo " ]}"
} >"$RESULTS/gpu_check.json"
echo "gpu_check: $( [ $status = 0 ] && echo 'every part passed' || echo 'some parts did not pass'); summary in $RESULTS/gpu_check.json" >&2
exit $status
