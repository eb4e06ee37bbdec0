"""Clinic cohorts for ``benchmarks/federation_gain.py``: K primary-care clinics whose sites differ
from the bundle's training cohort, each case embedded once by the bundle's own encoders (the
clinic's EdgeModel), cached on disk per seed so that every method is scored on the same cases.

The deployment population (``edge_runtime.synthetic.deployment_site``, also behind `edge-export
synth --clinic-site`) was fixed before any method was compared.
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CASE_BASE = 6_000_000  # case indices of this benchmark (training cohorts, demo and other benchmarks use others)
MAX_CLINICS = 64
MAX_CASES = 1_000  # per clinic: labelled cases first, held-out test cases after them


@dataclass(frozen=True)
class Layout:
    clinics: int  # K, the largest federation measured (smaller ones are its first clinics)
    labelled: int  # n, the most labelled cases per clinic (fewer: the first ones)
    test: int  # held-out cases per clinic

    def __post_init__(self) -> None:
        if not (1 <= self.clinics <= MAX_CLINICS and self.labelled + self.test <= MAX_CASES):
            raise ValueError(f"layout out of range: {self}")


def first_case(seed: int, clinic: int) -> int:
    return CASE_BASE + (seed * MAX_CLINICS + clinic) * MAX_CASES


def _cohort(bundle):
    from edge_runtime.synthetic import InputSpec, SynthConfig, SyntheticCohort

    pre, syn = bundle.preprocessing, bundle.manifest["synthetic"]
    spec = InputSpec(ct_grid=pre.ct.grid, tile=pre.pathology.tile, n_genes=len(pre.genomics.genes))
    return SyntheticCohort(SynthConfig(seed=int(syn["seed"]), n_sites=int(syn["n_sites"]), spec=spec))


_WORKER: dict = {}


def _init_worker(bundle_dir: str) -> None:
    from edge_runtime.bundle import default_public_key_path, load_bundle
    from edge_runtime.keys import load_public_key
    from edge_runtime.model import EdgeModel

    bundle = load_bundle(Path(bundle_dir), load_public_key(default_public_key_path(Path(bundle_dir))))
    _WORKER.update(bundle=bundle, model=EdgeModel.from_bundle(bundle, threads=1), cohort=_cohort(bundle))


def _embed_clinic(job: tuple[int, int, int]) -> tuple[np.ndarray, ...]:
    """Embeddings, masks, labels and the generator's oracle score of one clinic's cases."""
    from edge_runtime import MODALITIES
    from edge_runtime.preprocess import prepare_case
    from edge_runtime.synthetic import observed_oracle

    seed, clinic, count = job
    bundle, model, cohort = _WORKER["bundle"], _WORKER["model"], _WORKER["cohort"]
    site = cohort.add_deployment_site(seed, clinic)
    dim = model.dim
    emb = np.zeros((count, len(MODALITIES), dim), np.float32)
    mask = np.zeros((count, len(MODALITIES)), np.uint8)
    labels = np.zeros(count, np.int64)
    oracle = np.zeros(count)
    start = first_case(seed, clinic)
    for j in range(count):
        _, label, _, signal, present = cohort.draws(start + j, site)
        case = cohort.case(start + j, site)
        inputs = prepare_case(case, bundle.preprocessing).inputs
        labels[j], oracle[j] = case.label, observed_oracle(signal, present)
        for i, m in enumerate(MODALITIES):
            if m in inputs:
                emb[j, i], mask[j, i] = model.embed(m, inputs[m]), 1
    return emb, mask, labels, oracle


def cohort_file(work: Path, bundle_key: str, seed: int, layout: Layout) -> Path:
    return work / f"gain-{bundle_key[:12]}-s{seed}-k{layout.clinics}-n{layout.labelled}-t{layout.test}.npz"


def clinic_data(bundle_dir: Path, bundle_key: str, seed: int, layout: Layout, work: Path, processes: int = 2) -> dict:
    """{emb (K, N, M, d), mask (K, N, M), labels (K, N), oracle (K, N)}: labelled cases first, then
    test cases; cached in ``work`` (written atomically, keyed by the encoders and preprocessing:
    the bundle's encoder key)."""
    path = cohort_file(work, bundle_key, seed, layout)
    if not path.exists():
        jobs = [(seed, k, layout.labelled + layout.test) for k in range(layout.clinics)]
        with mp.get_context("spawn").Pool(processes, _init_worker, (str(bundle_dir),)) as pool:
            parts = pool.map(_embed_clinic, jobs)
        arrays = {name: np.stack([p[i] for p in parts]) for i, name in enumerate(("emb", "mask", "labels", "oracle"))}
        work.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
