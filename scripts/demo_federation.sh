#!/usr/bin/env bash
# Federation on loopback, the last part of the demo (scripts/demo.sh calls it):
#   bash scripts/demo_federation.sh OUT VENV_SERVER VENV_CLINIC
# OUT holds the signed bundle (OUT/bundle, OUT/bundle.pub). An `edge-server` on 127.0.0.1 publishes
# it as version 1; K primary-care clinics (sites shifted from the training cohort, `edge-export synth
# --clinic-site`) enroll and run `edge-run sync --manifest` for every round of the bundle's
# fine-tuning plan, spending the product's lifetime budget (epsilon 0.5, delta 1e-5) and no more.
# Each pulled version is scored on the clinic's own validation split before it goes live. Then every
# clinic's held-out cases are scored by version 1 (before), the last global version (after) and by a
# local-only DP fine-tune at the same epsilon (no federation). Two clinics work at a time (2 cores).
# The clinic side runs from VENV_CLINIC (no torch); the server from VENV_SERVER ('.[export,server]').
# Env: SEED (the bundle's cohort seed, 0), CONFIG (tiny), K (clinics, 16), TRAIN (labelled cases per
# clinic, 400), HELDOUT (100).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="$1"; SV="$2"; CV="$3"
SEED="${SEED:-0}"; CONFIG="${CONFIG:-tiny}"; K="${K:-16}"; TRAIN="${TRAIN:-400}"; HELDOUT="${HELDOUT:-100}"
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
edge_server init --home "$HOME_SRV" --min-clients "$K" --round-seconds 3600
edge_server publish --home "$HOME_SRV" "$OUT/bundle" --trusted-key "$OUT/bundle.pub"

echo "== edge-server serve on $URL (background; log in $FED/server.log)"
"${EDGE_SERVER[@]}" serve --home "$HOME_SRV" --host 127.0.0.1 --port "$PORT" --tick 0.5 >"$FED/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true' EXIT  # the server and any clinic job still running
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

CLINICS=(); for i in $(seq 1 "$K"); do CLINICS+=("$(printf 'c%02d' "$i")"); done
[ "$K" -ge 1 ] && [ "$K" -le 64 ] || { echo "K=$K: between 1 and 64 clinics (edge-export synth --clinic-site 0..63)" >&2; exit 2; }
read -r ROUNDS EPOCHS < <("$CV/bin/python" -c '
import json, sys
plan = json.load(open(sys.argv[1])).get("finetune", {})
print(plan.get("rounds", 1), plan.get("rounds", 1) * plan.get("epochs", 10.0))' "$OUT/bundle/manifest.json")
two_at_a_time() {  # two_at_a_time FUNCTION ARGS...: FUNCTION CLINIC ARGS for every clinic, two at once
  local fn="$1" pids=() c
  shift
  for c in "${CLINICS[@]}"; do
    "$fn" "$c" "$@" &
    pids+=($!)
    if [ "${#pids[@]}" -ge 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
}

echo "== $K clinics, each its own primary-care site (shifted from the training cohort): $TRAIN labelled + $HELDOUT held-out cases"
make_data() {
  local c="$1" i=$((10#${1#c} - 1))
  edge_export synth --out "$FED/data/$c/train" --cases "$TRAIN" --clinic-site "$i" --seed "$SEED" --config "$CONFIG" \
    --ct-format nifti --start $((7000000 + 10000 * i)) >/dev/null
  edge_export synth --out "$FED/data/$c/heldout" --cases "$HELDOUT" --clinic-site "$i" --seed "$SEED" --config "$CONFIG" \
    --ct-format nifti --start $((7005000 + 10000 * i)) >/dev/null
}
two_at_a_time make_data
echo "data in $FED/data/CLINIC/{train,heldout}"

echo "== edge-run enroll (one-time token from edge-server token; the server key is pinned)"
for c in "${CLINICS[@]}"; do
  edge_run enroll --server "$URL" --token "$(edge_server token --home "$HOME_SRV" --clinic "$c")" --state "$FED/clinics/$c" >/dev/null
done
echo "${#CLINICS[@]} clinics enrolled"

round_closed() {  # round_closed N: wait until round N is aggregated
  for _ in $(seq 1 600); do
    if edge_server rounds --home "$HOME_SRV" --json | "$CV/bin/python" -c \
      'import json, sys; r = json.load(sys.stdin); n = int(sys.argv[1]); sys.exit(0 if len(r) >= n and r[n - 1]["state"] == "closed" else 1)' "$1"
    then return 0; fi
    sleep 0.5
  done
  echo "round $1 was not aggregated in time; server log:" >&2; tail -20 "$FED/server.log" >&2; return 1
}
sync_clinic() {  # sync_clinic CLINIC ROUND: one `edge-run sync --manifest`, its JSON report kept
  local c="$1" st="$FED/clinics/$1"
  edge_run sync --state "$st" --manifest "$FED/data/$c/train/manifest.csv" --json >"$FED/logs/$c-r$2.json"
  [ -d "$FED/v1/$c" ] || cp -r "$st/bundles/v1" "$FED/v1/$c"  # version 1 kept aside for the comparison below
}
round_summary() {
  "$CV/bin/python" -c '
import json, sys
from pathlib import Path
logs, rnd, clinics = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
docs = [json.loads((logs / f"{c}-r{rnd}.json").read_text()) for c in clinics]
spent = [d["finetune"]["privacy"]["epsilon_spent"] for d in docs if isinstance(d["finetune"], dict)]
held = [c for c, d in zip(clinics, docs) if d["activation"]["status"] == "held back"]
auc = [d["activation"]["val_auc"] for d in docs if d["activation"].get("scored")]
version = docs[0]["version"]
line = f"round {rnd}: version {version}, mean local validation AUC {sum(auc) / max(len(auc), 1):.3f}, held back by {len(held)}"
line += f" clinic(s); {len(spent)} updates sent, epsilon spent per clinic {min(spent):.3f}-{max(spent):.3f} of 0.5" if spent else " clinic(s); nothing sent"
print(line)' "$FED/logs" "$1" "${CLINICS[@]}"
}
mkdir -p "$FED/logs" "$FED/v1"

echo "== $ROUNDS rounds (the bundle's plan): every clinic runs edge-run sync --manifest (pull, score the version on its"
echo "   validation split, DP fine-tune the plan's parameters, seal + sign + upload); a round closes when all $K updates are in"
for rnd in $(seq 1 "$ROUNDS"); do
  two_at_a_time sync_clinic "$rnd"
  round_closed "$rnd"
  round_summary "$rnd"
done

echo "== edge-run sync once more: every clinic pulls the last version and scores it (its budget is spent: nothing is sent)"
two_at_a_time sync_clinic final
round_summary final
LAST="$("$CV/bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["version"])' "$FED/logs/c01-rfinal.json")"
edge_run status --state "$FED/clinics/c01"

echo "== local-only DP fine-tuning at the same epsilon 0.5 and as many steps (no federation; one round of $EPOCHS epochs), for comparison"
local_only() {
  local c="$1" st="$FED/local/$1"
  mkdir -p "$st" && cp -r "$FED/clinics/$c/cache" "$st/cache"  # the same PC's embedding cache
  edge_run finetune --bundle "$FED/v1/$c" --trusted-key "$FED/clinics/$c/sync/server.pub" --state "$st" \
    --manifest "$FED/data/$c/train/manifest.csv" --rounds 1 --epochs "$EPOCHS" --tolerance 1 --json >"$FED/logs/$c-local.json"
}
two_at_a_time local_only

echo "== held-out AUC per clinic: version 1 (before), version $LAST (after the federation), the local-only head"
evaluate() {
  local c="$1" st="$FED/clinics/$1" cases="$FED/data/$1/heldout/manifest.csv"
  edge_run infer --bundle "$FED/v1/$c" --trusted-key "$st/sync/server.pub" --state "$FED/eval/$c-v1" --manifest "$cases" \
    --json >"$FED/$c-v1.jsonl"
  edge_run infer --bundle "$st/bundles/v$LAST" --trusted-key "$st/sync/server.pub" --state "$FED/eval/$c-last" --manifest "$cases" \
    --json >"$FED/$c-last.jsonl"
  edge_run infer --bundle "$FED/v1/$c" --trusted-key "$st/sync/server.pub" --state "$FED/local/$c" --manifest "$cases" \
    --json >"$FED/$c-local.jsonl"
}
two_at_a_time evaluate
args=()
for c in "${CLINICS[@]}"; do
  args+=(--clinic "$c" "$FED/data/$c/heldout/manifest.csv" "$FED/$c-v1.jsonl" "$FED/$c-last.jsonl" --local "$c" "$FED/$c-local.jsonl")
done
"$CV/bin/python" scripts/federation_demo.py "${args[@]}" --before-label v1 --after-label "v$LAST" --json "$FED/auc.json"
echo "(table in $FED/auc.json; the server is stopped on exit)"
