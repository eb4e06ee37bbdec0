#!/usr/bin/env bash
# Fresh machine -> own virtual environment -> full test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch==2.13.0 (the `export` extra) resolves to the CPU build; the clinic part never needs it.
"$VENV/bin/python" -m pip install -q '.[export,dev]'
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest ran no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
