"""Which encoder variant to run: chosen once at export from measured figures, and again on the
clinic PC for its own CPU. Pure functions over measured tables; no measuring here."""

from __future__ import annotations

from dataclasses import dataclass, field

from .cpuinfo import cpu_class

CLASS_RANK = {"baseline": 0, "avx2": 1, "vnni": 2}


@dataclass(frozen=True)
class Measured:
    name: str
    auc: float
    p95_ms: float  # whole case (reading + model), against the latency budget
    model_p95_ms: float  # encoders + head: what the candidates differ in, the ranking key
    peak_rss_mb: float  # whole fresh process, against the memory budget


@dataclass
class Selection:
    chosen: str
    ok: bool
    reasons: dict[str, list[str]] = field(default_factory=dict)  # candidate -> the limits it fails

    def message(self) -> str:
        if self.ok:
            return f"chose {self.chosen}: fastest candidate within accuracy and both budgets"
        return f"no candidate meets every limit; wrote the best, {self.chosen}, which fails: " + "; ".join(self.reasons[self.chosen])


def failures(m: Measured, reference_auc: float, tolerance: float, mem_budget_mb: float, latency_budget_ms: float) -> list[str]:
    out = []
    if reference_auc - m.auc > tolerance:
        out.append(f"AUC {m.auc:.4f} is {reference_auc - m.auc:.4f} below the FP32 student's {reference_auc:.4f} (tolerance {tolerance:g})")
    if m.p95_ms > latency_budget_ms:
        out.append(f"p95 latency {m.p95_ms:.1f} ms > budget {latency_budget_ms:g} ms")
    if m.peak_rss_mb > mem_budget_mb:
        out.append(f"peak RSS {m.peak_rss_mb:.1f} MB > budget {mem_budget_mb:g} MB")
    return out


def choose(
    measured: list[Measured], reference_auc: float, tolerance: float, mem_budget_mb: float, latency_budget_ms: float
) -> Selection:
    """The fastest candidate that meets accuracy and both budgets. When none does: the fastest one
    within accuracy, else the most accurate, with ``ok`` False and the limits it fails."""
    if not measured:
        raise ValueError("no candidate to choose from")
    reasons = {m.name: failures(m, reference_auc, tolerance, mem_budget_mb, latency_budget_ms) for m in measured}
    by_speed = sorted(measured, key=lambda m: (m.model_p95_ms, -m.auc, m.name))
    passing = [m for m in by_speed if not reasons[m.name]]
    if passing:
        return Selection(passing[0].name, True, reasons)
    accurate = [m for m in by_speed if reference_auc - m.auc <= tolerance]
    best = accurate[0] if accurate else max(measured, key=lambda m: (m.auc, -m.model_p95_ms))
    return Selection(best.name, False, reasons)


def variant_for_cpu(manifest: dict, features: list[str] | set[str]) -> tuple[str, str]:
    """(variant, why) for a clinic CPU with ``features``, without measuring: the export's choice when
    this CPU is of the class it was measured on or a faster one for INT8 (VNNI > AVX2 > baseline);
    otherwise the FP32 variant, which no CPU runs slowly (INT8 convolutions gain only with VNNI)."""
    default = manifest["default_variant"]
    measured_on = (manifest.get("selection") or {}).get("cpu_class")
    here = cpu_class(features)
    names = {v["name"] for v in manifest.get("variants", [])}
    if measured_on is None or CLASS_RANK.get(here, 0) >= CLASS_RANK.get(measured_on, 0) or "fp32" not in names:
        return default, f"export's choice (measured on a {measured_on or 'unknown'} CPU; this one is {here})"
    return "fp32", f"this CPU ({here}) is slower at INT8 than the export's ({measured_on}); run `edge-run profile --select`"
