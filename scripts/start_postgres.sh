#!/usr/bin/env bash
# Start a throwaway PostgreSQL 15 cluster (Debian package) for the server tests and print its URL.
#   export DWFL_TEST_POSTGRES_URL=$(bash scripts/start_postgres.sh [DIR] [PORT])
# Stop it with: pg_ctl -D DIR/data stop   (as the cluster's owner). Root is not allowed to own a
# cluster, so under root the cluster runs as the `postgres` system user.
set -euo pipefail
BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
DIR=${1:-$(mktemp -d /tmp/dwfl-pg.XXXXXX)}
mkdir -p "$DIR"
PORT=${2:-$((20000 + RANDOM % 20000))}
RUN=()
OWNER=$(id -un)
if [ "$(id -u)" = 0 ]; then RUN=(runuser -u postgres --); OWNER=postgres; chown -R postgres "$DIR"; chmod 755 "$DIR"; fi
"${RUN[@]}" "$BIN/initdb" -D "$DIR/data" -U "$OWNER" -A trust --no-sync >"$DIR/initdb.log" 2>&1
"${RUN[@]}" "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w \
    -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null
"${RUN[@]}" "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U "$OWNER" dwfl
echo "postgresql://$OWNER@127.0.0.1:$PORT/dwfl"
