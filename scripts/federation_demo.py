"""AUC per clinic of the global model before and after federation, from `edge-run infer --json` outputs.

    python scripts/federation_demo.py --clinic NAME MANIFEST BEFORE.jsonl AFTER.jsonl [--clinic ...]
        [--local NAME LOCAL.jsonl ...] [--before-label v1] [--after-label v3] [--json FILE]

MANIFEST is the clinic's held-out labelled manifest; BEFORE/AFTER are `edge-run infer --manifest
MANIFEST --json` outputs (one JSON object per case; rejected cases are skipped) of the two global
model versions; LOCAL (optional) the clinic's local-only fine-tuned head on the same cases. Torch-free: runs from the clinic install (AUC from edge_runtime.metrics).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_runtime.manifest import parse_label, read_manifest  # noqa: E402
from edge_runtime.metrics import roc_auc  # noqa: E402


def predictions(path: Path) -> dict[str, float]:
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            doc = json.loads(line)
            if not doc.get("rejected"):
                out[str(doc["case_id"])] = float(doc["probability"])
    return out


def auc(manifest: Path, preds: dict[str, float], classes: list[str]) -> tuple[float, int]:
    labels = {e.case_id: parse_label(e.label, classes) for e in read_manifest(manifest).entries if e.label}
    ids = [c for c in labels if c in preds]
    if not ids:
        raise SystemExit(f"{manifest}: no labelled case has a prediction")
    return roc_auc(np.array([labels[c] for c in ids]), np.array([preds[c] for c in ids])), len(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clinic", nargs=4, action="append", required=True, metavar=("NAME", "MANIFEST", "BEFORE", "AFTER"))
    ap.add_argument("--local", nargs=2, action="append", default=[], metavar=("NAME", "LOCAL"),
                    help="the clinic's local-only fine-tuned head on the same cases (infer --json)")
    ap.add_argument("--before-label", default="before")
    ap.add_argument("--after-label", default="after")
    ap.add_argument("--classes", default="negative,positive", help="class names, negative first")
    ap.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    args = ap.parse_args()
    classes = args.classes.split(",")
    local = dict(args.local)
    rows = []
    for name, manifest, before, after in args.clinic:
        a0, n = auc(Path(manifest), predictions(Path(before)), classes)
        a1, _ = auc(Path(manifest), predictions(Path(after)), classes)
        row = {"clinic": name, "cases": n, "auc_before": round(a0, 4), "auc_after": round(a1, 4), "change": round(a1 - a0, 4)}
        if name in local:
            row["auc_local"] = round(auc(Path(manifest), predictions(Path(local[name])), classes)[0], 4)
        rows.append(row)
    b, a = args.before_label, args.after_label
    has_local = all("auc_local" in r for r in rows)
    extra = f" {'AUC local-only':>14} {'fed - local':>11}" if has_local else ""
    print(f"{'clinic':<10} {'held-out cases':>14} {'AUC ' + b:>12} {'AUC ' + a:>12} {'change':>8}" + extra)
    for r in rows:
        more = f" {r['auc_local']:>14.3f} {r['auc_after'] - r['auc_local']:>+11.3f}" if has_local else ""
        print(f"{r['clinic']:<10} {r['cases']:>14} {r['auc_before']:>12.3f} {r['auc_after']:>12.3f} {r['change']:>+8.3f}" + more)
    keys = ("auc_before", "auc_after", "auc_local") if has_local else ("auc_before", "auc_after")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    more = f" {mean['auc_local']:>14.3f} {mean['auc_after'] - mean['auc_local']:>+11.3f}" if has_local else ""
    print(f"{'mean':<10} {'':>14} {mean['auc_before']:>12.3f} {mean['auc_after']:>12.3f} {mean['auc_after'] - mean['auc_before']:>+8.3f}" + more)
    print(f"clinics whose held-out AUC rose with the federation: {sum(r['change'] > 0 for r in rows)} of {len(rows)}")
    if args.json:
        args.json.write_text(json.dumps({"before": b, "after": a, "clinics": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
