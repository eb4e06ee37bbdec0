#!/usr/bin/env bash
# Fresh machine -> end-to-end demo: export a tiny model (server side, with torch), then run it the
# way a clinic PC does, from a second environment that has no torch at all; end with a federation on
# loopback (aggregation server + three clinics, two rounds), then the hospital tier: three hospitals train
# the teacher over the network, it is distilled into a bundle that two clinics sync.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-demo-out}"
SEED="${SEED:-0}"

echo "== server side: virtual environment with the export and server extras (CPU torch; FastAPI, uvicorn, SQLAlchemy)"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q '.[export,server]'

echo "== edge-export pipeline: synthetic cohort -> federated teacher (DW-FL) -> student -> ONNX -> INT8 candidates measured here -> signed bundle"
.venv/bin/edge-export pipeline --out "$OUT" --config tiny --seed "$SEED"

echo "== edge-export synth: held-out cases written as a clinic has them (DICOM series, PNG tiles, CSV), some modalities missing"
.venv/bin/edge-export synth --out "$OUT/cases" --cases 24 --seed "$SEED" --config tiny

echo "== clinic side: plain 'pip install .' (no torch)"
python3 -m venv .venv-clinic
.venv-clinic/bin/python -m pip install -q --upgrade pip
.venv-clinic/bin/python -m pip install -q .
if .venv-clinic/bin/python -c "import torch" 2>/dev/null; then echo "torch leaked into the clinic install" >&2; exit 1; fi
echo "torch is not installed in .venv-clinic"

echo "== edge-run infer on the case files (hashes and signature verified first)"
.venv-clinic/bin/edge-run infer --bundle "$OUT/bundle" --manifest "$OUT/cases/manifest.csv"
.venv-clinic/bin/edge-run infer --bundle "$OUT/bundle" --manifest "$OUT/cases/manifest.csv" --json > "$OUT/predictions.jsonl"
echo "(JSON lines in $OUT/predictions.jsonl; the true labels are in $OUT/cases/manifest.csv)"

echo "== edge-run profile --select: every variant measured on this PC in a fresh process, the best pinned in $OUT/state"
.venv-clinic/bin/edge-run profile --bundle "$OUT/bundle" --select --cases 30 --state "$OUT/state"

echo "== edge-run profile against the budgets (1.8 GB, 200 ms), with the pinned variant"
.venv-clinic/bin/edge-run profile --bundle "$OUT/bundle" --cases 50 --mem-budget 1.8GB --latency-budget 200ms --json \
  --state "$OUT/state" | tee "$OUT/profile.json"
.venv-clinic/bin/edge-run profile --bundle "$OUT/bundle" --cases 50 --state "$OUT/state"

echo "== edge-run doctor: is this PC fit for the bundle?"
.venv-clinic/bin/edge-run doctor --bundle "$OUT/bundle" --state "$OUT/state" --cases 10

echo "== federation on loopback: edge-server + three clinics (different sites), two DP rounds, AUC before/after per clinic"
SEED="$SEED" CONFIG=tiny bash scripts/demo_federation.sh "$OUT" .venv .venv-clinic

echo "== hospital tier on loopback: three hospitals train the teacher over the network (3 rounds), distilled and published to two clinics"
SEED="$SEED" bash scripts/demo_hospitals.sh "$OUT" .venv .venv-clinic
