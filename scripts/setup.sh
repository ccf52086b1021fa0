#!/usr/bin/env bash
# Set up dm_assets on a fresh Debian machine: system packages FFCV needs (when missing),
# a virtual environment in .venv, and the pinned Python dependencies.
# Runs as root or as a user with sudo. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
DEB_PACKAGES=(pkg-config libopencv-dev libturbojpeg0-dev slurm-wlm munge chromium)

sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)

missing=()
for pkg in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "${#sudo_cmd[@]}" -gt 0 ] && ! command -v sudo >/dev/null 2>&1; then
    echo "setup: Debian packages ${missing[*]} are missing, and installing them needs root:" >&2
    echo "  run 'apt-get install ${missing[*]}' as root (or install sudo), then rerun" >&2
    exit 1
  fi
  echo "setup: installing Debian packages: ${missing[*]}"
  log=$(mktemp)
  if ! { "${sudo_cmd[@]}" apt-get update -qq &&
         "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive \
           apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "setup: apt-get failed (log above); install ${missing[*]} and rerun" >&2
    exit 1
  fi
  rm -f "$log"
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.dm_assets-installed"
if [ ! -f "$stamp" ] || [ requirements.lock -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing pinned dependencies (first run builds FFCV from source: a few minutes)"
  # --no-compile, then compileall on every core: pip byte-compiles every installed module
  # one after the other (about 19,000 files, 110 s on 2 cores). The bytecode must be there:
  # the Makefile (and often the environment) sets PYTHONDONTWRITEBYTECODE, so modules left
  # uncompiled would be compiled again by every process that imports them
  pipi() { "$VENV/bin/python" -m pip install -q --no-compile --disable-pip-version-check "$@" \
    2>&1 | { grep -v "^WARNING: Location" || true; }; return "${PIPESTATUS[0]}"; }
  # FFCV builds from source against what is already installed (numpy, torch, Cython).
  pipi setuptools==84.2.1 -c requirements.lock numpy torch Cython pkgconfig
  pipi --no-build-isolation -c requirements.lock ffcv
  pipi -r requirements.lock
  pipi --no-deps --no-build-isolation -e .
  # a few files in the packages' test folders are not Python 3 (pip skips them too): their
  # errors are not set-up's; the import check below catches a package that does not load
  "$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c \
    'import sysconfig; print(sysconfig.get_path("purelib"))')" >/dev/null 2>&1 || true
  touch "$stamp"
fi
"$VENV/bin/python" -c "import dm_assets, numpy, torch, ffcv, dagster, mlflow" \
  || { echo "setup: the environment in $VENV is broken; remove it and rerun" >&2; exit 1; }

# numba compiles the solver's and the bootstrap's kernels on first use (about 85 s on 2 cores;
# precompile splits them between two processes: about 55 s)
# and caches them beside their source: compile them here, not inside the first fit; again
# whenever a kernel's source changed (dm_assets/precompile.py)
kernels=(dm_assets/regression/cd_kernel.py dm_assets/regression/bit_stats.py
         dm_assets/evaluation/uncertainty.py)
kernel_stamp="$VENV/.dm_assets-kernels"
stale=0
if [ ! -f "$kernel_stamp" ] || [ "$stamp" -nt "$kernel_stamp" ]; then stale=1; fi
for source in "${kernels[@]}"; do
  if [ "$source" -nt "$kernel_stamp" ]; then stale=1; fi
done
if [ "$stale" -eq 1 ]; then
  echo "setup: compiling the numba kernels (once per change of their source: about a minute)"
  "$VENV/bin/python" -m dm_assets.precompile
  touch "$kernel_stamp"
fi
echo "setup: ready ($VENV)"
