#!/usr/bin/env bash
# Hospitals to clinics in one chain, on loopback (scripts/demo.sh calls it; DESIGN §10):
#   bash scripts/demo_hospitals.sh OUT VENV_SERVER VENV_CLINIC
# One `edge-server` runs both federations. Three hospitals, each holding only its own site's cases of
# the synthetic cohort, train the whole tiny teacher over the network for ROUNDS rounds
# (`edge-export train-round`: pull the signed global teacher, train locally with FedBN, seal the update
# as a stream, upload it in signed chunks; the server aggregates with DW-FL). Hospital 1 then distills
# the federated teacher into the clinic bundle (`edge-export pipeline --teacher-state`), the server
# publishes it, and two clinics sync it and fine-tune with DP (the head federation).
# Env: SEED (0), ROUNDS (3), CASES (training cases per hospital, 120), VAL (40).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="$1"; SV="$2"; CV="$3"
SEED="${SEED:-0}"; ROUNDS="${ROUNDS:-3}"; CASES="${CASES:-120}"; VAL="${VAL:-40}"
FED="$OUT/hospitals"
HOME_SRV="$FED/server"

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
PORT="$("$SV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
URL="http://127.0.0.1:$PORT"

echo "== edge-export teacher-init + edge-server publish-teacher: the first global teacher (tiny, seed $SEED), signed as a teacher version"
edge_server init --home "$HOME_SRV" --min-clients 2 --round-seconds 3600
edge_export teacher-init --out "$FED/teacher-init" --config tiny --seed "$SEED" --sites 3 --cases-per-site "$CASES"
edge_server publish-teacher --home "$HOME_SRV" "$FED/teacher-init"

echo "== edge-server serve on $URL (both federations; log in $FED/server.log)"
"${EDGE_SERVER[@]}" serve --home "$HOME_SRV" --host 127.0.0.1 --port "$PORT" --tick 0.5 >"$FED/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true' EXIT
"$SV/bin/python" - "$PORT" "$SERVER_PID" <<'EOF'
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

teacher_versions() {  # how many teacher versions the server has published
  edge_server rounds --home "$HOME_SRV" --json | "$SV/bin/python" -c \
    'import json, sys; print(1 + sum(1 for r in json.load(sys.stdin) if r["federation"] == "teacher" and r["result_version"]))'
}

HOSPITALS=(st-anne royal-west general-east)
echo "== edge-export enroll: three hospitals with hospital-tier tokens (a clinic token would be refused)"
for k in 0 1 2; do
  h="${HOSPITALS[$k]}"
  edge_export enroll --server "$URL" --token "$(edge_server token --home "$HOME_SRV" --clinic "$h" --tier hospital)" --state "$FED/$h"
done

for rnd in $(seq 1 "$ROUNDS"); do
  echo "== teacher round $rnd: each hospital trains on its own $CASES cases (site k of the cohort), uploads a sealed, chunked update"
  for k in 0 1 2; do
    h="${HOSPITALS[$k]}"
    edge_export train-round --state "$FED/$h" --synthetic-site "$k" --synthetic-sites 3 --cohort-seed "$SEED" \
      --cases "$CASES" --val-cases "$VAL" --json 2>/dev/null >"$FED/$h-r$rnd.json"
    "$SV/bin/python" -c 'import json, sys; d = json.load(open(sys.argv[1])); print(sys.argv[2] + ": the global teacher on its validation cases before training: AUC %.3f; %d chunks sent" % (d["val_auc_before"], d["update"]["chunks_sent"]))' \
      "$FED/$h-r$rnd.json" "$h"
  done
  for _ in $(seq 1 240); do [ "$(teacher_versions)" -gt "$rnd" ] && break; sleep 0.5; done
  [ "$(teacher_versions)" -gt "$rnd" ] || { echo "teacher round $rnd was not aggregated; server log:" >&2; tail -20 "$FED/server.log" >&2; exit 1; }
done

echo "== edge-export pipeline --teacher-state: ${HOSPITALS[0]} distills the federated teacher into the clinic bundle (no teacher training here)"
edge_export pipeline --out "$FED/export" --config tiny --seed "$SEED" --teacher-state "$FED/${HOSPITALS[0]}" --variants fp32,int8,int8_ct_stem_fp32

echo "== edge-server publish: the bundle becomes the head federation's version; two clinics sync it and send DP head updates"
edge_server publish --home "$HOME_SRV" "$FED/export/bundle" --trusted-key "$FED/export/bundle.pub"
CLINICS=(north south)
for i in 0 1; do
  c="${CLINICS[$i]}"
  edge_export synth --out "$FED/data/$c" --cases 80 --sites 4 --site $((i + 1)) --seed "$SEED" --config tiny --start $((3000000 + 10000 * i)) >/dev/null
  edge_run enroll --server "$URL" --token "$(edge_server token --home "$HOME_SRV" --clinic "$c")" --state "$FED/clinics/$c"
  edge_run sync --state "$FED/clinics/$c" --manifest "$FED/data/$c/manifest.csv" --epsilon 2 --round-epsilon 1 --epochs 3
done
for _ in $(seq 1 240); do
  edge_server rounds --home "$HOME_SRV" --json | "$SV/bin/python" -c \
    'import json, sys; sys.exit(0 if any(r["federation"] == "head" and r["result_version"] for r in json.load(sys.stdin)) else 1)' && break
  sleep 0.5
done
for c in "${CLINICS[@]}"; do edge_run sync --state "$FED/clinics/$c"; done
edge_server rounds --home "$HOME_SRV"
"$SV/bin/python" - "$FED/export/report.json" <<'EOF'
import json, sys
auc = json.load(open(sys.argv[1]))["auc"]
print("test AUC on the exporter's held-out cases: the federated teacher %.3f, its student %.3f (FP32) / %.3f (INT8); report %s"
      % (auc["teacher"], auc["student_fp32"], auc["student_int8"], sys.argv[1]))
EOF
