#!/usr/bin/env bash
# The test suite on the other Python versions dm_assets supports: `make test` runs the whole
# suite on .venv's interpreter, then this script, for every version that pyproject.toml's
# classifiers list ("Programming Language :: Python :: 3.12") other than .venv's:
#
#   finds an interpreter of that version (scripts/find_python.sh: $PYTHON3_12, PATH, pyenv,
#   /usr/local/bin, /usr/bin); a version not found is reported and skipped, not a failure;
#   sets it up in its own environment, .venv312 for 3.12 (scripts/setup.sh with PYTHON= and
#   VENV=; the first run builds FFCV and installs the pinned dependencies: minutes);
#   runs pytest there on the tests that match the marker expression $PYTEST_MARK (pytest -m;
#   empty or unset: every test).
#
# Exit status: 0 when every version found passed (or none was found); otherwise that of the
# first failure. Set DM_OTHER_PYTHONS=0 to skip this step altogether.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
pytest_args=()
[ -z "${PYTEST_MARK:-}" ] || pytest_args=(-m "$PYTEST_MARK")

if [ "${DM_OTHER_PYTHONS:-1}" = "0" ]; then
  echo "test_pythons: skipped (DM_OTHER_PYTHONS=0)"
  exit 0
fi
main=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
mapfile -t supported < <(sed -n 's/^ *"Programming Language :: Python :: \(3\.[0-9]*\)",$/\1/p' \
  pyproject.toml)
if [ "${#supported[@]}" -eq 0 ]; then
  echo "test_pythons: pyproject.toml lists no 'Programming Language :: Python :: 3.X'" \
    "classifier" >&2
  exit 1
fi

status=0
for version in "${supported[@]}"; do
  [ "$version" != "$main" ] || continue
  if ! python=$(scripts/find_python.sh "$version"); then
    variable="PYTHON${version/./_}"
    echo "test_pythons: Python $version not found (looked at \$$variable, python$version on" \
      "PATH, pyenv, /usr/local/bin, /usr/bin): the suite ran on Python $main only. Install" \
      "$version (e.g. 'pyenv install $version') or set $variable=/path/to/python$version."
    continue
  fi
  venv=".venv${version/./}"
  echo "test_pythons: Python $version ($python) in $venv, tests: ${PYTEST_MARK:-all}"
  PYTHON="$python" VENV="$venv" scripts/setup.sh
  code=0
  "$venv/bin/python" -m pytest "${pytest_args[@]}" || code=$?
  if [ "$code" -ne 0 ]; then
    echo "test_pythons: the suite failed on Python $version ($venv): exit $code" >&2
    [ "$status" -ne 0 ] || status=$code
  fi
done
exit "$status"
