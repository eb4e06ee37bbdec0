#!/usr/bin/env bash
# Fresh machine -> own virtual environment -> a throwaway PostgreSQL (Debian package) for the server
# tests -> full test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch==2.13.0 (the `export` extra) resolves to the CPU build; the clinic part never needs it.
"$VENV/bin/python" -m pip install -q '.[export,dev,server]'

# The server tests run against SQLite and a real PostgreSQL: install it (as root, with apt) when it is
# missing, start a private cluster, stop it on exit. They fail, never skip, without one.
if [ -z "${DWFL_TEST_POSTGRES_URL:-}" ]; then
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "installing PostgreSQL (Debian package) for the server tests"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
      echo "PostgreSQL is not installed: install the 'postgresql' package or set DWFL_TEST_POSTGRES_URL" >&2
      exit 1
    fi
  fi
  PG_BIN="$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")"
  PG_DIR="$(mktemp -d /tmp/dwfl-pg.XXXXXX)"
  export PG_BIN
  DWFL_TEST_POSTGRES_URL="$(bash scripts/start_postgres.sh "$PG_DIR")"
  export DWFL_TEST_POSTGRES_URL
  stop_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast stop >/dev/null 2>&1 || true
    else "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast stop >/dev/null 2>&1 || true; fi
    rm -rf "$PG_DIR"
  }
  trap stop_pg EXIT
fi
export DWFL_REQUIRE_POSTGRES=1

set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest ran no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
