#!/usr/bin/env bash
# Set up dm_assets on a fresh Debian machine: system packages FFCV needs (when missing),
# a virtual environment in .venv, and the pinned Python dependencies.
# Runs as root or as a user with sudo. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
DEB_PACKAGES=(pkg-config libopencv-dev libturbojpeg0-dev)

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo_cmd=(sudo); else
    echo "setup: not root and no sudo; install ${DEB_PACKAGES[*]} by hand" >&2; fi
fi

missing=()
for pkg in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.dm_assets-installed"
if [ ! -f "$stamp" ] || [ requirements.lock -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing pinned dependencies (first run builds FFCV from source: a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip==25.3 setuptools==80.9.0 wheel==0.45.1
  # numpy, torch and Cython first: FFCV's setup.py imports them while building.
  "$VENV/bin/python" -m pip install -q -c requirements.lock numpy torch Cython pkgconfig
  "$VENV/bin/python" -m pip install -q --no-build-isolation -c requirements.lock ffcv
  "$VENV/bin/python" -m pip install -q -r requirements.lock
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  touch "$stamp"
fi
"$VENV/bin/python" -c "import dm_assets, numpy, torch, ffcv, dagster, mlflow" \
  || { echo "setup: the environment in $VENV is broken; remove it and rerun" >&2; exit 1; }
echo "setup: ready ($VENV)"
