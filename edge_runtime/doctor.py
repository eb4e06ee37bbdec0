"""`edge-run doctor`: is this PC fit to run the bundle? CPU and its INT8 features, cores, RAM, free
disk, ONNX Runtime, which variant fits, a short profile against the budgets, privacy budget left.
Pure gathering here; the CLI prints it (a table for people, JSON for machines)."""

from __future__ import annotations

import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .cpuinfo import this_cpu

MIN_FREE_DISK_MB = 500.0  # embedding cache, fine-tuned heads and a new bundle version


@dataclass
class Check:
    name: str
    value: str
    ok: bool
    detail: str = ""


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, value: str, ok: bool = True, detail: str = "") -> None:
        self.checks.append(Check(name, value, ok, detail))

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checks": [c.__dict__ for c in self.checks], **self.facts}


def machine_checks(report: Report, state_dir: Path, mem_budget_mb: float) -> None:
    import onnxruntime as ort
    import psutil

    cpu = this_cpu()
    report.facts["cpu"] = cpu.to_dict()
    report.add("CPU", cpu.model, True, f"INT8 class {cpu.cls}; features {', '.join(cpu.features) or 'none of ' + 'AVX2/AVX-512/VNNI'}")
    report.add("cores", str(cpu.cores), cpu.cores >= 1)
    ram = psutil.virtual_memory()
    report.facts["ram_mb"] = {"total": round(ram.total / 1e6), "available": round(ram.available / 1e6)}
    report.add("RAM", f"{ram.total / 1e9:.1f} GB total, {ram.available / 1e9:.1f} GB free", ram.available / 1e6 >= mem_budget_mb * 0.5,
               f"budget {mem_budget_mb:g} MB")
    where = state_dir if state_dir.exists() else Path.home()
    free = shutil.disk_usage(where).free / 1e6
    report.facts["free_disk_mb"] = round(free)
    report.add("free disk", f"{free / 1e3:.1f} GB at {where}", free >= MIN_FREE_DISK_MB, f"needs {MIN_FREE_DISK_MB:g} MB")
    report.add("onnxruntime", ort.__version__, True, ", ".join(ort.get_available_providers()))
    report.add("python", platform.python_version(), True)


def privacy_checks(report: Report, state_dir: Path) -> None:
    """Each ledger read with its own recorded delta and budget (ClinicState.privacy_summaries)."""
    from .errors import BadInput
    from .state import ClinicState

    try:
        summaries = ClinicState(state_dir).privacy_summaries()
    except BadInput as exc:
        report.add("privacy budget", "ledger unreadable", False, str(exc))
        return
    if not summaries:
        report.add("privacy budget", "no fine-tuning yet", True)
    for s in summaries:
        report.facts.setdefault("privacy", []).append(s)
        report.add(f"privacy budget ({s['dataset']})", f"epsilon left {s['epsilon_left']:.3f} of {s['epsilon_total']:g}",
                   s["epsilon_left"] > 0, f"spent {s['epsilon_spent']:.3f} in {s['rounds']} round(s), delta {s['delta']:g}")
