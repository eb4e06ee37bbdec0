#!/usr/bin/env bash
# Rerun every benchmark (results in benchmarks/results/NAME.json + NAME.png). Needs the demo's
# bundle (bash scripts/demo.sh, or: edge-export pipeline --out demo-out --config tiny) and the dev
# venv (.venv with '.[export,dev,server]'). Slow ones last; FAST=1 skips the teacher federations
# (the paired tiny tier: about 1 h for fedavg vs dwfl_mw over 10 seeds on 2 cores; the ablations ~1 h).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
OUT="${OUT:-demo-out}"
$PY benchmarks/reader_memory.py
$PY benchmarks/edge_profile.py --bundle "$OUT/bundle" --cases 200
$PY benchmarks/edge_vs_teacher.py --out "$OUT"
$PY benchmarks/calibration_memory.py --bundle "$OUT/bundle"
$PY benchmarks/finetune_memory.py --bundle "$OUT/bundle"
$PY benchmarks/finetune_utility.py --bundle "$OUT/bundle"
$PY benchmarks/server_load.py
$PY benchmarks/server_soak.py --clinics 200 --rounds 30 --minutes 10
$PY benchmarks/fault_matrix.py --seeds 10
$PY -m pip install -q "atheris>=2.3" && $PY benchmarks/fuzz_atheris.py --seconds 120
$PY benchmarks/seed_protocol.py
$PY benchmarks/federation_noniid.py --tune
$PY benchmarks/federation_noniid.py --tier fast --seeds 0-49
$PY benchmarks/federation_noniid.py --tier fast-dp --seeds 0-49
if [ -z "${FAST:-}" ]; then
  $PY benchmarks/federation_noniid.py --tier tiny --seeds 0-9 --strategies fedavg,dwfl_mw --threads 2
  $PY benchmarks/federation_ablations.py --seeds 0,1,2 --rounds 6
fi
