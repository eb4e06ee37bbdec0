#!/usr/bin/env bash
# Federation on loopback, the last part of the demo (scripts/demo.sh calls it):
#   bash scripts/demo_federation.sh OUT VENV_SERVER VENV_CLINIC
# OUT holds the signed bundle (OUT/bundle, OUT/bundle.pub). An `edge-server` on 127.0.0.1 publishes
# it as version 1; three clinics with data from three different sites of the synthetic cohort enroll
# and run `edge-run sync --manifest` for two rounds (a round closes at 3 updates); then every clinic's
# held-out labelled cases are scored by the global model before (v1) and after (v3). The clinic side
# runs from VENV_CLINIC (no torch); the server from VENV_SERVER ('.[export,server]').
# Env: SEED (the bundle's cohort seed, 0), CONFIG (tiny), TRAIN (cases per clinic, 120), HELDOUT (80).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="$1"; SV="$2"; CV="$3"
SEED="${SEED:-0}"; CONFIG="${CONFIG:-tiny}"; TRAIN="${TRAIN:-120}"; HELDOUT="${HELDOUT:-80}"
FED="$OUT/federation"
HOME_SRV="$FED/server"

# the installed commands; `python -m` when a venv has the sources on PYTHONPATH instead of installed
cmd() {  # cmd VENV SCRIPT MODULE: the command as a bash array in CMD
  if [ -x "$1/bin/$2" ]; then CMD=("$1/bin/$2"); else CMD=("$1/bin/python" -m "$3"); fi
}
cmd "$SV" edge-server server.cli; EDGE_SERVER=("${CMD[@]}")
cmd "$SV" edge-export export.cli; EDGE_EXPORT=("${CMD[@]}")
cmd "$CV" edge-run edge_runtime.cli; EDGE_RUN=("${CMD[@]}")
edge_server() { "${EDGE_SERVER[@]}" "$@"; }
edge_export() { "${EDGE_EXPORT[@]}" "$@"; }
edge_run() { "${EDGE_RUN[@]}" "$@"; }

rm -rf "$FED"
mkdir -p "$FED"
PORT="$("$CV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
URL="http://127.0.0.1:$PORT"

echo "== edge-server init / publish: server keys (Ed25519 + HPKE), SQLite, the bundle re-signed as version 1"
edge_server init --home "$HOME_SRV" --min-clients 3 --round-seconds 3600
edge_server publish --home "$HOME_SRV" "$OUT/bundle" --trusted-key "$OUT/bundle.pub"

echo "== edge-server serve on $URL (background; log in $FED/server.log)"
"${EDGE_SERVER[@]}" serve --home "$HOME_SRV" --host 127.0.0.1 --port "$PORT" --tick 0.5 >"$FED/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true' EXIT
"$CV/bin/python" - "$PORT" "$SERVER_PID" <<'EOF'
import os, socket, sys, time
port, pid = int(sys.argv[1]), int(sys.argv[2])
for _ in range(300):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        sys.exit(0)
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            sys.exit("edge-server serve exited; see its log")
        time.sleep(0.1)
sys.exit("edge-server serve did not start")
EOF

CLINICS=(north south east)
echo "== three clinics, each with its own site's cases (labelled): north = site 1, south = site 2, east = site 3"
for i in 0 1 2; do
  c="${CLINICS[$i]}"; site=$((i + 1))
  edge_export synth --out "$FED/data/$c/train" --cases "$TRAIN" --sites 4 --site "$site" --seed "$SEED" --config "$CONFIG" \
    --start $((2000000 + 10000 * i)) >/dev/null
  edge_export synth --out "$FED/data/$c/heldout" --cases "$HELDOUT" --sites 4 --site "$site" --seed "$SEED" --config "$CONFIG" \
    --start $((2005000 + 10000 * i)) >/dev/null
  echo "$c: $TRAIN training + $HELDOUT held-out cases of site $site in $FED/data/$c"
done

echo "== edge-run enroll (one-time token from edge-server token; the server key is pinned)"
for c in "${CLINICS[@]}"; do
  edge_run enroll --server "$URL" --token "$(edge_server token --home "$HOME_SRV" --clinic "$c")" --state "$FED/clinics/$c"
done

round_closed() {  # round_closed N: wait until round N is aggregated
  for _ in $(seq 1 240); do
    if edge_server rounds --home "$HOME_SRV" --json | "$CV/bin/python" -c \
      'import json, sys; r = json.load(sys.stdin); n = int(sys.argv[1]); sys.exit(0 if len(r) >= n and r[n - 1]["state"] == "closed" else 1)' "$1"
    then return 0; fi
    sleep 0.5
  done
  echo "round $1 was not aggregated in time; server log:" >&2; tail -20 "$FED/server.log" >&2; return 1
}

for rnd in 1 2; do
  echo "== round $rnd: edge-run sync --manifest (pull the global model, DP fine-tune the head, seal + sign + upload)"
  for c in "${CLINICS[@]}"; do
    edge_run sync --state "$FED/clinics/$c" --manifest "$FED/data/$c/train/manifest.csv" --epsilon 2 --round-epsilon 1 --epochs 5
    # a clinic keeps the current version and the one before; keep version 1 aside for the comparison below
    [ -d "$FED/v1/$c" ] || { mkdir -p "$FED/v1" && cp -r "$FED/clinics/$c/bundles/v1" "$FED/v1/$c"; }
  done
  round_closed "$rnd"
done
edge_server rounds --home "$HOME_SRV"

echo "== edge-run sync (no data): every clinic pulls the latest global model, verified with the pinned server key"
for c in "${CLINICS[@]}"; do edge_run sync --state "$FED/clinics/$c"; done
LAST="$("$CV/bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["version"])' "$FED/clinics/north/bundles/current.json")"

echo "== the global model on each clinic's held-out cases: version 1 (before) and version $LAST (after federation)"
args=()
for c in "${CLINICS[@]}"; do
  st="$FED/clinics/$c"
  for v in 1 "$LAST"; do  # a fresh state folder: the global model itself, not the clinic's locally fine-tuned head
    bundle="$st/bundles/v$v"; [ "$v" = 1 ] && bundle="$FED/v1/$c"
    edge_run infer --bundle "$bundle" --trusted-key "$st/sync/server.pub" --state "$FED/eval-state" \
      --manifest "$FED/data/$c/heldout/manifest.csv" --json >"$FED/$c-v$v.jsonl"
  done
  args+=(--clinic "$c" "$FED/data/$c/heldout/manifest.csv" "$FED/$c-v1.jsonl" "$FED/$c-v$LAST.jsonl")
done
"$CV/bin/python" scripts/federation_demo.py "${args[@]}" --before-label v1 --after-label "v$LAST" --json "$FED/auc.json"
echo "(table in $FED/auc.json; the server is stopped on exit)"
