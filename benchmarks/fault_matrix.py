"""The fault matrix with more seeds than CI runs: kill -9 at seeded random steps (and the named
narrow windows) of a clinic's `edge-run sync` and of `edge-server serve`, and a clinic's disk full
during the ledger charge; restart, check.

It runs tests/test_fault_matrix.py (the scenarios and their invariants live there, one place) with
FAULT_SEEDS=0..N-1 and collects one row per scenario: where the process died, the state it left,
what the restart did. A scenario whose invariants fail is a failed test, counted here as a violation.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import png_path, write_result  # noqa: E402


def clinic_state(k: dict) -> str:
    if k["current"] is None:
        return "no version installed yet"
    if k["charges"] == 0:
        return "version installed, nothing charged"
    if k["updates"] == 0:
        return "charged, no update written"
    if k["on_server"] == 0:
        return "update written, not sent" if k["pending"] == 0 else "update queued, not sent"
    return "stored by the server, clinic not told" if k["pending"] else "stored, answer recorded"


def server_state(k: dict) -> str:
    if len(k["versions"]) > 1:
        return "new version published"
    if k["round1"] == "aggregating":
        return "round claimed, not published"
    return f"round open, {k['updates']} of 3 updates stored"


def restart_outcome(row: dict) -> str:
    if row["side"] == "clinic":
        extra = row["extra_charges"]
        how = {"stored": "sent", "already have it": "re-sent, server had it",
               "nothing to send": "nothing left to send"}[row["restart_upload"]]
        return f"{how}; {'1 extra charge (crash after charging)' if extra else 'no extra charge'}"
    ups = collections.Counter(row["restart_uploads"])
    return "aggregated once; re-sent: " + ", ".join(f"{n}x {s}" for s, n in sorted(ups.items()))


def fault(row: dict) -> str:
    return row.get("fault", "killed")


def plot(rows: list[dict], violations: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    phases = sorted({(r["side"], fault(r), r["phase"]) for r in rows}, key=lambda x: (x[0] != "clinic", x[2], x[1]))
    states = sorted({r["state"] for r in rows})
    grid = np.zeros((len(phases), len(states)), dtype=int)
    for r in rows:
        grid[phases.index((r["side"], fault(r), r["phase"])), states.index(r["state"])] += 1
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(phases) + 2.5))
    ax.imshow(grid, cmap="Blues")
    for i in range(len(phases)):
        for j in range(len(states)):
            if grid[i, j]:
                ax.text(j, i, str(grid[i, j]), ha="center", va="center")
    ax.set_yticks(range(len(phases)), [f"{s}: {f} during {p}" for s, f, p in phases])
    ax.set_xticks(range(len(states)), states, rotation=30, ha="right", fontsize=8)
    ax.set_title(f"kill -9 / disk full at {len(rows)} points: the state left behind; {violations} invariant violations after restart")
    fig.tight_layout()
    path = png_path("fault_matrix")
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10, help="seeded points per phase (CI runs 2)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dwfl-faults-") as tmp:
        out = Path(tmp) / "rows.jsonl"
        env = {**os.environ, "FAULT_SEEDS": ",".join(str(i) for i in range(args.seeds)), "FAULT_MATRIX_OUT": str(out)}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_fault_matrix.py", "-q", "-p", "no:cacheprovider"],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    for r in rows:
        r["state"] = clinic_state(r["after_kill"]) if r["side"] == "clinic" else server_state(r["after_kill"])
        r["restart"] = restart_outcome(r)
    table = collections.defaultdict(collections.Counter)
    for r in rows:
        table[f"{r['side']} {fault(r)} during {r['phase']}"][f"{r['state']} -> {r['restart']}"] += 1
    figures = {"scenarios": len(rows), "violations": len(failed), "pytest": tail, "seconds": round(seconds, 1),
               "seeded_points_per_phase": args.seeds, "matrix": {k: dict(v) for k, v in sorted(table.items())}}
    print(json.dumps(figures, indent=2))
    png = plot(rows, len(failed))
    path = write_result("fault_matrix", figures, {"failed": failed, "scenarios": rows, "plot": png.name})
    print(f"wrote {path} and {png}")
    if proc.returncode != 0:
        sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
