#!/usr/bin/env bash
# Fresh machine -> end-to-end demo: export a tiny model (server side, with torch), then run it the
# way a clinic PC does, from a second environment that has no torch at all.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-demo-out}"
SEED="${SEED:-0}"

echo "== server side: virtual environment with the export extra (CPU torch)"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q '.[export]'

echo "== edge-export pipeline: synthetic cohort -> teacher -> student -> ONNX -> INT8 -> signed bundle"
.venv/bin/edge-export pipeline --out "$OUT" --config tiny --seed "$SEED"

echo "== clinic side: plain 'pip install .' (no torch)"
python3 -m venv .venv-clinic
.venv-clinic/bin/python -m pip install -q --upgrade pip
.venv-clinic/bin/python -m pip install -q .
if .venv-clinic/bin/python -c "import torch" 2>/dev/null; then echo "torch leaked into the clinic install" >&2; exit 1; fi
echo "torch is not installed in .venv-clinic"

echo "== edge-run infer (hashes and signature verified first)"
.venv-clinic/bin/edge-run infer --bundle "$OUT/bundle" --synthetic \
  --case-id 1000000 --case-id 1000001 --case-id 1000002 --case-id 1000003 --json

echo "== edge-run profile against the budgets (1.8 GB, 200 ms)"
.venv-clinic/bin/edge-run profile --bundle "$OUT/bundle" --cases 50 --mem-budget 1.8GB --latency-budget 200ms --json \
  | tee "$OUT/profile.json"
.venv-clinic/bin/edge-run profile --bundle "$OUT/bundle" --cases 50
