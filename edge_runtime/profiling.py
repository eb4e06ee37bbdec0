"""Latency percentiles and whole-process peak memory against the clinic budgets."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .model import EdgeModel
from .synthetic import Case, SyntheticCohort

WARMUP_CASES = 2  # the first runs of a session allocate its arenas: run, not counted
PROFILE_FIRST_CASE = 2_000_000  # synthetic profile cases, disjoint from training, validation and test indices


def peak_rss_mb() -> float:
    """Peak resident set size of this process since it started (imports included), in MB.

    On Linux this is VmHWM of the process's own address space: getrusage's ru_maxrss would also
    carry the parent's peak across fork + exec and overstate a small process started by a big one.
    """
    if sys.platform == "win32":
        import psutil

        return psutil.Process().memory_info().peak_wset / 1e6
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * (1 if sys.platform == "darwin" else 1024) / 1e6


def percentiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": round(float(np.percentile(arr, q)), 3) for q in (50, 95, 99)}


@dataclass
class ProfileResult:
    latencies_ms: list[float]  # whole case: reading/resampling + encoders + head
    by_modalities: dict[str, list[float]]
    peak_rss_mb: float
    mem_budget_mb: float
    latency_budget_ms: float
    model_ms: list[float] = field(default_factory=list)  # encoders + head only
    stages_ms: dict[str, list[float]] = field(default_factory=dict)  # preprocess / per modality / head

    @property
    def latency(self) -> dict[str, float]:
        return percentiles(self.latencies_ms)

    @property
    def passed(self) -> bool:
        return self.latency["p95"] <= self.latency_budget_ms and self.peak_rss_mb <= self.mem_budget_mb

    def to_dict(self) -> dict:
        return {
            "cases": len(self.latencies_ms),
            "latency_ms": self.latency,
            "latency_ms_by_modalities": {
                k: {"cases": len(v), **percentiles(v)} for k, v in sorted(self.by_modalities.items())
            },
            "model_ms": percentiles(self.model_ms) if self.model_ms else None,
            "stages_ms": {k: {"cases": len(v), **percentiles(v)} for k, v in self.stages_ms.items()},
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "budgets": {"mem_mb": self.mem_budget_mb, "latency_ms": self.latency_budget_ms},
            "pass": self.passed,
            "pid": os.getpid(),
        }


def profile_cases(cohort: SyntheticCohort, count: int) -> Iterator[Case]:
    """The cases `edge-run profile` times (``count`` of them after the warm-up ones), every modality
    mix as the cohort has it; `profile --select` and the export measure each variant on these too."""
    return cohort.iter_cases(PROFILE_FIRST_CASE, count + WARMUP_CASES)


def profile(model: EdgeModel, cases: Iterable[Case], mem_budget_mb: float, latency_budget_ms: float) -> ProfileResult:
    """Run every case through ``model``; the pass criterion is p95 latency and peak RSS."""
    latencies: list[float] = []
    model_ms: list[float] = []
    by_mod: dict[str, list[float]] = {}
    stages: dict[str, list[float]] = {}
    for i, case in enumerate(cases):
        pred = model.predict(case)
        if i < WARMUP_CASES:
            continue
        latencies.append(pred.latency_ms)
        model_ms.append(pred.model_ms)
        by_mod.setdefault("+".join(pred.modalities), []).append(pred.latency_ms)
        for stage, ms in (pred.stages_ms or {}).items():
            stages.setdefault(stage, []).append(ms)
    return ProfileResult(latencies, by_mod, peak_rss_mb(), mem_budget_mb, latency_budget_ms, model_ms, stages)
