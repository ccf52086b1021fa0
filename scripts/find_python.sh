#!/usr/bin/env bash
# Print the path of a Python interpreter of one minor version, e.g. `scripts/find_python.sh 3.12`.
#
# Looks, in this order, at: $PYTHON3_12 (the variable named after the version; an error when it
# is set but is not that version), `python3.12` on PATH, pyenv's versions ($PYENV_ROOT, default
# ~/.pyenv; the newest patch release), and /usr/local/bin, /usr/bin. A candidate counts only when
# it runs and reports that version (a pyenv shim for a version pyenv has not activated does
# not). Exit status 0 with the path on stdout; 1 with nothing on stdout when none is found.
set -euo pipefail

version=${1:?usage: scripts/find_python.sh MAJOR.MINOR (e.g. 3.12)}
[[ $version =~ ^[0-9]+\.[0-9]+$ ]] || {
  echo "find_python: '$version' is not MAJOR.MINOR (e.g. 3.12)" >&2
  exit 2
}

is_version() {  # the interpreter $1 runs and is Python $version
  [ -n "$1" ] && [ -x "$1" ] || return 1
  local got
  got=$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || return 1
  [ "$got" = "$version" ]
}

variable="PYTHON${version/./_}"
chosen=${!variable:-}
if [ -n "$chosen" ]; then
  resolved=$(command -v "$chosen" || true)
  if ! is_version "$resolved"; then
    echo "find_python: $variable=$chosen is not a Python $version interpreter" >&2
    exit 2
  fi
  echo "$resolved"
  exit 0
fi

candidates=()
on_path=$(command -v "python$version" 2>/dev/null || true)
[ -z "$on_path" ] || candidates+=("$on_path")
pyenv_root=${PYENV_ROOT:-$HOME/.pyenv}
if [ -d "$pyenv_root/versions" ]; then
  while IFS= read -r dir; do
    candidates+=("$dir/bin/python$version")
  done < <(find "$pyenv_root/versions" -mindepth 1 -maxdepth 1 -name "$version.*" | sort -rV)
fi
candidates+=("/usr/local/bin/python$version" "/usr/bin/python$version")

for candidate in "${candidates[@]}"; do
  if is_version "$candidate"; then
    echo "$candidate"
    exit 0
  fi
done
exit 1
