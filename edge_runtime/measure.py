"""Measure one model (encoder files + head) in a fresh Python process: p50/p95 latency of whole
cases and of the model alone, per stage, and the process's peak RSS with its imports. A fresh
process per candidate, so one candidate's arenas never count against another.

Run as ``python -m edge_runtime.measure`` with a JSON request on stdin; prints one JSON object.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .errors import BadInput

FULL_CASE = ("ct", "pathology", "genomics")


@dataclass(frozen=True)
class Request:
    encoders: dict[str, str]
    head: str
    preprocessing: dict
    classes: list[str]
    dim: int
    synthetic_seed: int
    n_sites: int
    cases: int = 40
    threads: int = 2
    first_case: int = 2_000_000  # disjoint from training, validation and test indices
    full_cases_only: bool = True  # three-modality cases: the slowest, what the budgets are about


def measure(request: Request, timeout_s: float = 900) -> dict:
    """Run the worker in a fresh interpreter; a clear error when it fails."""
    # Absolute paths: the worker runs from the package's folder (importable in a source tree too).
    request = replace(request, encoders={m: str(Path(p).resolve()) for m, p in request.encoders.items()},
                      head=str(Path(request.head).resolve()))
    proc = subprocess.run([sys.executable, "-m", "edge_runtime.measure"], input=json.dumps(asdict(request)),
                          capture_output=True, text=True, timeout=timeout_s, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BadInput(f"measuring {request.encoders.get('ct', '?')} failed: {tail}")
    return json.loads(proc.stdout)


def _cases(request: Request, spec, count: int):
    from .synthetic import SynthConfig, SyntheticCohort

    cohort = SyntheticCohort(SynthConfig(seed=request.synthetic_seed, n_sites=request.n_sites, spec=spec))
    index, yielded = request.first_case, 0
    while yielded < count:
        case = cohort.case(index)
        index += 1
        if request.full_cases_only and case.modalities != FULL_CASE:
            continue
        yielded += 1
        yield case


def _worker() -> None:
    from .model import EdgeModel
    from .preprocess import Preprocessing
    from .profiling import WARMUP_CASES, profile
    from .synthetic import InputSpec

    request = Request(**json.loads(sys.stdin.read()))
    pre = Preprocessing.from_dict(request.preprocessing)
    model = EdgeModel({m: Path(p) for m, p in request.encoders.items()}, Path(request.head), pre, request.classes,
                      request.dim, request.threads)
    spec = InputSpec(ct_grid=pre.ct.grid, tile=pre.pathology.tile, n_genes=len(pre.genomics.genes))
    result = profile(model, _cases(request, spec, request.cases + WARMUP_CASES), float("inf"), float("inf"))
    doc = result.to_dict()
    print(json.dumps({"cases": doc["cases"], "latency_ms": doc["latency_ms"], "model_ms": doc["model_ms"],
                      "stages_ms": doc["stages_ms"], "peak_rss_mb": doc["peak_rss_mb"], "threads": request.threads}))


if __name__ == "__main__":
    _worker()
