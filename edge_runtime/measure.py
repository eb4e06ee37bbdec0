"""Measure one model (encoder files + head) in a fresh Python process: p50/p95 latency of whole
cases and of the model alone, per stage, and the process's peak RSS with its imports. A fresh
process per variant, so one variant's arenas never count against another.

`measure_variants` measures every encoder variant of one model this way, on the very cases
`edge-run profile` times, and chooses with `select.choose`: the export (`export.candidates.search`)
and `edge-run profile --select` both call it.

Run as ``python -m edge_runtime.measure`` with a JSON request on stdin; prints one JSON object.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import MODALITIES
from .errors import BadInput
from .select import Measured, Selection, choose


@dataclass(frozen=True)
class MeasureSpec:
    """What every variant of one model shares when measured: the head, the preprocessing, classes and
    embedding size, the synthetic cohort the profile cases come from, how many cases, threads."""

    head: str
    preprocessing: dict
    classes: list[str]
    dim: int
    synthetic_seed: int
    n_sites: int
    cases: int = 40
    threads: int = 2

    def request(self, encoders: dict[str, str]) -> "Request":
        return Request(**asdict(self), encoders=encoders)

    @classmethod
    def of_bundle(cls, bundle, *, cases: int, threads: int) -> "MeasureSpec":
        manifest = bundle.manifest
        return cls(str(bundle.path(manifest["head"]["file"])), manifest["preprocessing"], list(bundle.classes),
                   int(manifest["embedding_dim"]), int(manifest["synthetic"]["seed"]), int(manifest["synthetic"]["n_sites"]),
                   cases, threads)


@dataclass(frozen=True)
class Request(MeasureSpec):
    """One variant to measure: the shared spec and its encoder files (modality -> ONNX file)."""

    encoders: dict[str, str] = field(default_factory=dict)


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


@dataclass(frozen=True)
class Candidate:
    name: str
    encoders: dict[str, str]  # modality -> ONNX file
    val_auc: float


@dataclass
class VariantMeasurements:
    figures: dict[str, dict]  # variant -> what the worker measured
    selection: Selection


def bundle_candidates(bundle) -> tuple[list[Candidate], float, float]:
    """A verified bundle's variants as candidates, with the reference AUC and tolerance the export chose by."""
    manifest = bundle.manifest
    sel = manifest.get("selection") or {}
    variants = {v["name"]: v for v in manifest["variants"]}
    reference = float(sel.get("reference_val_auc", variants.get("fp32", {}).get("val_auc", 0.0)))
    candidates = [Candidate(name, {m: str(bundle.path(v["encoders"][m])) for m in MODALITIES}, float(v.get("val_auc", reference)))
                  for name, v in variants.items()]
    return candidates, reference, float(sel.get("tolerance", 0.005))


def measure_variants(
    spec: MeasureSpec, candidates: list[Candidate], *, reference_auc: float, tolerance: float, mem_budget_mb: float,
    latency_budget_ms: float, on_measured: Callable[[Candidate, dict], None] | None = None,
) -> VariantMeasurements:
    """Measure each candidate in a fresh process, then choose the fastest that meets accuracy
    (validation AUC within ``tolerance`` of ``reference_auc``) and both budgets."""
    if not candidates:
        raise BadInput("no encoder variant to measure")
    figures: dict[str, dict] = {}
    for c in candidates:
        figures[c.name] = measure(spec.request(c.encoders))
        if on_measured is not None:
            on_measured(c, figures[c.name])
    table = [Measured(c.name, c.val_auc, figures[c.name]["latency_ms"]["p95"], figures[c.name]["model_ms"]["p95"],
                      figures[c.name]["peak_rss_mb"]) for c in candidates]
    return VariantMeasurements(figures, choose(table, reference_auc, tolerance, mem_budget_mb, latency_budget_ms))


def _worker() -> None:
    from .model import EdgeModel
    from .preprocess import Preprocessing
    from .profiling import profile, profile_cases
    from .synthetic import InputSpec, SynthConfig, SyntheticCohort

    request = Request(**json.loads(sys.stdin.read()))
    pre = Preprocessing.from_dict(request.preprocessing)
    model = EdgeModel({m: Path(p) for m, p in request.encoders.items()}, Path(request.head), pre, request.classes,
                      request.dim, request.threads)
    spec = InputSpec(ct_grid=pre.ct.grid, tile=pre.pathology.tile, n_genes=len(pre.genomics.genes))
    # The cohort `edge-run profile` builds from the bundle (`synthetic_cohort`): the same cases, the same mix.
    cohort = SyntheticCohort(SynthConfig(seed=request.synthetic_seed, n_sites=request.n_sites, spec=spec))
    result = profile(model, profile_cases(cohort, request.cases), float("inf"), float("inf"))
    doc = result.to_dict()
    print(json.dumps({k: doc[k] for k in ("cases", "latency_ms", "latency_ms_by_modalities", "model_ms", "stages_ms", "peak_rss_mb")}
                     | {"threads": request.threads}))


if __name__ == "__main__":
    _worker()
