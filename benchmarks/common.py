"""Shared by the benchmarks: machine description and result files (JSON + PNG side by side)."""

from __future__ import annotations

import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import psutil

    from edge_runtime.cpuinfo import this_cpu

    cpu = this_cpu()
    return {
        "cpu": cpu.model,
        "cores": cpu.cores,
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "features": list(cpu.features),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write_result(name: str, figures: dict, extra: dict | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "machine": machine(),
        "figures": figures,
        **(extra or {}),
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def png_path(name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{name}.png"


def run_json(cmd: list[str], cwd: Path | None = None) -> dict:
    """Run a measurement in a fresh process; its last stdout line is a JSON object."""
    import subprocess

    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or RESULTS.parent.parent)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])
