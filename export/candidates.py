"""Encoder variants for the bundle (DESIGN §7): build the candidates, score each on validation
cases, fall back node by node where INT8 costs too much accuracy, measure each in a fresh process on
this machine, and choose the fastest one that meets accuracy and both budgets.

Candidates: FP32; full INT8 (MinMax); INT8 with the CT encoder's single-channel 3D stem in FP32;
INT8 with every 3D convolution in FP32; and the stem recipe with Entropy or Percentile calibration
for the 2D and genomics encoders (ORT's histogram calibrators keep every case's activations, too
much for the CT volume, so CT stays MinMax, which streams).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_runtime import MODALITIES
from edge_runtime.errors import BadInput
from edge_runtime.measure import Candidate, MeasureSpec, measure_variants
from edge_runtime.metrics import roc_auc
from edge_runtime.model import session_options
from edge_runtime.preprocess import Preprocessing, prepare_case
from edge_runtime.progress import progress
from edge_runtime.select import Selection
from edge_runtime.synthetic import SyntheticCohort
from quantize.calibration import StreamingReader
from quantize.fallback import accuracy_fallback
from quantize.graph import conv3d_nodes, quantizable_nodes
from quantize.sensitivity import rank_nodes
from quantize.static import quantize_int8

from .config import VARIANT_NAMES
from .data import PreparedCases

HISTOGRAM_CALIB_CASES = 16  # Entropy / Percentile hold every calibration case's activations
Log = Callable[[str], None]


@dataclass(frozen=True)
class EncoderRecipe:
    """How one encoder is built: FP32, or INT8 with a calibration method and FP32 nodes."""

    int8: bool
    method: str = "minmax"
    exclude: tuple[str, ...] = ()

    def describe(self) -> str:
        if not self.int8:
            return "fp32"
        return f"int8 {self.method}" + (f", {len(self.exclude)} node(s) fp32" if self.exclude else "")


@dataclass
class Variant:
    name: str
    recipes: dict[str, EncoderRecipe]
    encoders: dict[str, Path] = field(default_factory=dict)
    val_auc: float = float("nan")
    parity_bound: float = float("nan")  # max |p - p_fp32| per case this variant promises
    fallback: list[dict] = field(default_factory=list)
    measured: dict | None = None

    def summary(self) -> dict:
        return {
            "name": self.name,
            "encoders": {m: r.describe() for m, r in self.recipes.items()},
            "fp32_nodes": {m: list(r.exclude) for m, r in self.recipes.items() if r.exclude},
            "val_auc": round(self.val_auc, 4),
            "parity_bound": self.parity_bound,
            "fallback": self.fallback,
            "measured": self.measured,
        }


class Builder:
    """Quantizes encoders on demand (each recipe once) and scores variants on validation cases
    through their embeddings (each encoder file run once over the cases)."""

    def __init__(self, fp32: dict[str, Path], head: Path, cohort: SyntheticCohort, pre: Preprocessing,
                 calib: range, val: PreparedCases, work: Path, threads: int = 2) -> None:
        self.fp32, self.head, self.cohort, self.pre, self.calib, self.val = fp32, head, cohort, pre, calib, val
        self.work, self.threads = work, threads
        self._files: dict[tuple[str, EncoderRecipe], Path] = {}
        self._embeddings: dict[Path, np.ndarray] = {}
        work.mkdir(parents=True, exist_ok=True)

    def calibration(self, modality: str, limit: int | None = None) -> Callable[[], StreamingReader]:
        indices = self.calib if limit is None else range(self.calib.start, self.calib.start + min(limit, len(self.calib)))

        def inputs() -> Iterator[dict[str, np.ndarray]]:
            for case in self.cohort.iter_cases(indices.start, len(indices)):
                prepared = prepare_case(case, self.pre).inputs
                if modality in prepared:
                    yield {"x": prepared[modality]}

        return lambda: StreamingReader(inputs)

    def encoder(self, modality: str, recipe: EncoderRecipe) -> Path:
        key = (modality, recipe)
        if key not in self._files:
            if not recipe.int8:
                self._files[key] = self.fp32[modality]
            else:
                limit = None if recipe.method == "minmax" else HISTOGRAM_CALIB_CASES
                out = self.work / f"{modality}-{len(self._files)}.onnx"
                self._files[key] = quantize_int8(self.fp32[modality], out, self.calibration(modality, limit)(),
                                                 list(recipe.exclude), recipe.method)
        return self._files[key]

    def embeddings(self, path: Path, modality: str) -> np.ndarray:
        if path not in self._embeddings:
            session = ort.InferenceSession(str(path), session_options(self.threads), providers=["CPUExecutionProvider"])
            i = MODALITIES.index(modality)
            rows = np.flatnonzero(self.val.mask[:, i] > 0)
            out = None
            for start in range(0, len(rows), 16):
                chunk = rows[start:start + 16]
                (emb,) = session.run(None, {"x": self.val.arrays[modality][chunk].astype(np.float32)})
                if out is None:
                    out = np.zeros((len(self.val), emb.shape[1]), np.float32)
                out[chunk] = emb
            self._embeddings[path] = out if out is not None else np.zeros((len(self.val), 1), np.float32)
        return self._embeddings[path]

    def probabilities(self, encoders: dict[str, Path]) -> np.ndarray:
        """Positive-class probability of every validation case with these encoder files (FP32 head)."""
        head = ort.InferenceSession(str(self.head), session_options(self.threads), providers=["CPUExecutionProvider"])
        emb = np.stack([self.embeddings(encoders[m], m) for m in MODALITIES], 1)
        (logits,) = head.run(None, {"embeddings": emb, "mask": self.val.mask.astype(np.float32)})
        z = logits - logits.max(1, keepdims=True)
        return np.exp(z[:, -1]) / np.exp(z).sum(1)

    def score(self, encoders: dict[str, Path]) -> float:
        """Validation AUC of the student with these encoder files."""
        return roc_auc(self.val.labels, self.probabilities(encoders))

    def build(self, variant: Variant) -> Variant:
        variant.encoders = {m: self.encoder(m, r) for m, r in variant.recipes.items()}
        variant.val_auc = self.score(variant.encoders)
        return variant

    def parity_bound(self, variant: Variant) -> float:
        """The bound the bundle states for |p(variant) - p(FP32)| per case: twice the largest gap seen
        on the validation cases, at least 0.01 (fresh cases may sit a little further out)."""
        fp32 = self.probabilities(dict(self.fp32))
        gap = float(np.max(np.abs(self.probabilities(variant.encoders) - fp32))) if len(fp32) else 0.0
        return round(max(0.01, 2 * gap), 4) if variant.recipes["ct"].int8 or variant.recipes["pathology"].int8 else 1e-5

    def with_fallback(self, variant: Variant, reference: float, tolerance: float, log: Log) -> Variant:
        """Keep the most sensitive INT8 nodes in FP32 until the validation AUC drop fits."""
        base = dict(variant.recipes)

        def quantize(excluded: list[str]) -> dict[str, Path]:
            recipes = {m: _exclude_more(r, [n.split("/", 1)[1] for n in excluded if n.startswith(m + "/")])
                       for m, r in base.items()}
            variant.recipes = recipes
            return {m: self.encoder(m, r) for m, r in recipes.items()}

        def rank(encoders: dict[str, Path]) -> list[str]:
            scored = []
            for m, r in base.items():
                if r.int8:
                    candidates = [n for n in quantizable_nodes(self.fp32[m]) if n not in r.exclude]
                    scored += [(f"{m}/{n}", s) for n, s in rank_nodes(self.fp32[m], encoders[m], self.calibration(m, 8), candidates)]
            return [n for n, _ in sorted(scored, key=lambda kv: kv[1])]

        result = accuracy_fallback(quantize, self.score, rank, reference, tolerance)
        variant.encoders, variant.val_auc = result.model, result.score
        variant.fallback = [{"fp32_nodes": h["excluded"], "val_auc": round(h["score"], 4)} for h in result.history]
        if result.excluded:
            log(f"{variant.name}: {len(result.excluded)} node(s) kept in FP32 -> validation AUC {result.score:.4f}"
                f" (FP32 {reference:.4f}, tolerance {tolerance:g})")
        return variant


def _exclude_more(recipe: EncoderRecipe, nodes: list[str]) -> EncoderRecipe:
    if not nodes or not recipe.int8:
        return recipe
    return EncoderRecipe(True, recipe.method, tuple(dict.fromkeys((*recipe.exclude, *nodes))))


def default_variants(fp32: dict[str, Path]) -> list[Variant]:
    conv3d = tuple(conv3d_nodes(fp32["ct"]))
    stem = conv3d[:1]
    int8 = EncoderRecipe(True)

    def mixed(ct: EncoderRecipe, method: str = "minmax") -> dict[str, EncoderRecipe]:
        return {"ct": ct, "pathology": EncoderRecipe(True, method), "genomics": EncoderRecipe(True, method)}

    return [
        Variant("fp32", {m: EncoderRecipe(False) for m in MODALITIES}),
        Variant("int8", mixed(int8)),
        Variant("int8_ct_stem_fp32", mixed(EncoderRecipe(True, "minmax", stem))),
        Variant("int8_ct_3d_fp32", mixed(EncoderRecipe(True, "minmax", conv3d))),
        Variant("int8_ct_stem_fp32_entropy", mixed(EncoderRecipe(True, "minmax", stem), "entropy")),
        Variant("int8_ct_stem_fp32_percentile", mixed(EncoderRecipe(True, "minmax", stem), "percentile")),
    ]


def check_variant_names(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The candidate set to build, in the canonical order; FP32 always (it is the accuracy reference)."""
    unknown = [n for n in names if n not in VARIANT_NAMES]
    if unknown:
        raise BadInput(f"unknown variant {unknown[0]!r}: choose from {', '.join(VARIANT_NAMES)}")
    return tuple(n for n in VARIANT_NAMES if n == "fp32" or n in names)


@dataclass
class SearchResult:
    variants: list[Variant]
    selection: Selection
    reference_auc: float
    tolerance: float


def search(builder: Builder, spec: MeasureSpec, *, tolerance: float, budgets: dict[str, float], log: Log,
           names: tuple[str, ...] = VARIANT_NAMES) -> SearchResult:
    """Build and score the candidates ``names`` (FP32 first), fall back where accuracy suffers,
    measure each in a fresh process and choose (``measure_variants``, as `profile --select` does)."""
    variants = [v for v in default_variants(builder.fp32) if v.name in check_variant_names(names)]
    with progress("building and scoring candidates", len(variants)) as advance:
        for v in variants:
            builder.build(v)
            advance(1)
    reference = variants[0].val_auc
    for v in variants[1:]:
        if reference - v.val_auc > tolerance:
            builder.with_fallback(v, reference, tolerance, log)
    for v in variants:
        v.parity_bound = builder.parity_bound(v)
    with progress("measuring candidates (fresh process each)", len(variants)) as advance:
        result = measure_variants(spec, [Candidate(v.name, {m: str(p) for m, p in v.encoders.items()}, v.val_auc) for v in variants],
                                  reference_auc=reference, tolerance=tolerance, mem_budget_mb=budgets["mem_mb"],
                                  latency_budget_ms=budgets["latency_ms"], on_measured=lambda _c, _f: advance(1))
    for v in variants:
        v.measured = result.figures[v.name]
        log(f"candidate {v.name:<30} val AUC {v.val_auc:.4f}  model p95 {v.measured['model_ms']['p95']:6.1f} ms"
            f"  case p95 {v.measured['latency_ms']['p95']:6.1f} ms  peak RSS {v.measured['peak_rss_mb']:6.1f} MB")
    log(result.selection.message())
    return SearchResult(variants, result.selection, reference, tolerance)
