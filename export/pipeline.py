"""The export pipeline end to end: synthetic cohort -> teacher -> student -> ONNX -> INT8 -> bundle.

Intermediate files live in a temporary folder under ``out``; the bundle is written atomically at the
end, so a failure at any step leaves no half bundle behind.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from edge_runtime import MODALITIES
from edge_runtime.bundle import default_public_key_path, write_bundle
from edge_runtime.cpuinfo import this_cpu
from edge_runtime.errors import BadInput
from edge_runtime.fsutil import sha256_file, write_atomic
from edge_runtime.keys import (
    generate_key,
    load_private_key,
    save_private_key,
    save_public_key,
)
from edge_runtime.measure import Request
from edge_runtime.metrics import roc_auc
from edge_runtime.model import EdgeModel
from edge_runtime.preprocess import Preprocessing
from edge_runtime.synthetic import SynthConfig, SyntheticCohort

from .candidates import Builder, SearchResult, Variant, search
from .config import TEST_START, VAL_START, PipelineConfig
from .data import PreparedCases, collate
from .federated import Federation, FederationSpec, Site
from .head_weights import save_head_weights
from .models import Student, Teacher, count_flops, count_parameters
from .onnx_export import export_student
from .report import REPORTED, plot_candidates
from .stats import fit_preprocessing
from .train import distill, load_pretrained, positive_probability, train_teacher

DEFAULT_BUDGETS = {"mem_mb": 1800.0, "latency_ms": 200.0}
DEFAULT_TOLERANCE = 0.005  # AUC drop allowed against the FP32 student
BUNDLE_DIR = "bundle"
SIGNING_KEY = "signing_key.pem"


@dataclass
class PipelineResult:
    bundle_dir: Path
    public_key: Path
    auc: dict[str, float]
    sizes_bytes: dict[str, int]
    parameters: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)  # one full three-modality case, batch 1
    candidates: list[dict] = field(default_factory=list)
    selection: dict = field(default_factory=dict)  # chosen, ok, reasons, cpu, budgets, tolerance

    @property
    def ok(self) -> bool:
        return bool(self.selection.get("ok", True))

    def to_dict(self) -> dict:
        return {
            "bundle": str(self.bundle_dir),
            "public_key": str(self.public_key),
            "auc": self.auc,
            "sizes_bytes": self.sizes_bytes,
            "parameters": self.parameters,
            "flops": self.flops,
            "seconds": self.seconds,
            "selection": self.selection,
            "candidates": self.candidates,
        }


@dataclass(frozen=True)
class Splits:
    train: range
    val: range
    test: range
    calib: range

    @classmethod
    def of(cls, cfg: PipelineConfig) -> "Splits":
        t = cfg.train
        # Disjoint index ranges; calibration reuses training cases. `edge-export synth` writes from
        # TEST_START by default, so demo files are held-out cases.
        return cls(
            train=range(0, t.train_cases),
            val=range(VAL_START, VAL_START + t.val_cases),
            test=range(TEST_START, TEST_START + t.test_cases),
            calib=range(0, t.calib_cases),
        )


def evaluate(
    cohort: SyntheticCohort, pre: Preprocessing, indices: range, teacher: torch.nn.Module, models: dict[str, EdgeModel], batch_size: int
) -> dict[str, float]:
    """AUC of the torch teacher and of each ONNX model on the same held-out cases; every case is
    generated once and goes through the clinic's own `EdgeModel.predict`."""
    labels, scores = [], {"teacher": [], **{name: [] for name in models}}
    for start in range(indices.start, indices.stop, batch_size):
        cases = list(cohort.iter_cases(start, min(batch_size, indices.stop - start)))
        labels.extend(c.label for c in cases)
        scores["teacher"].extend(positive_probability(teacher, collate(cases, pre)).tolist())
        for name, model in models.items():
            scores[name].extend(model.predict(case).probability for case in cases)
    return {name: round(roc_auc(np.asarray(labels), np.asarray(s)), 4) for name, s in scores.items()}


def _signing_key(out: Path, key_path: Path | None):
    if key_path is not None:
        return load_private_key(key_path), None
    return generate_key(), out / SIGNING_KEY


class StepTimer:
    """Wall-clock seconds per pipeline step, for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._clock = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] = round(now - self._clock, 2)
        self._clock = now


def manifest_body(
    cfg: PipelineConfig, seed: int, model_version: str, pre: Preprocessing, auc: dict[str, float], n_test: int, params: dict,
    variants: list[dict], selection: dict, budgets: dict[str, float],
) -> dict:
    """Everything the bundle says about the model, except the file list and signature."""
    return {
        "model_version": model_version,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.name,
        "classes": list(cfg.classes),
        "modalities": list(MODALITIES),
        "embedding_dim": cfg.model.dim,
        "preprocessing": pre.to_dict(),
        "synthetic": {"seed": seed, "n_sites": cfg.n_sites},
        "head": {"file": "head.onnx", "weights": "head.npz", "format": "onnx-fp32"},
        "variants": variants,
        "default_variant": selection["chosen"],
        "selection": selection,
        "metrics": {"test_cases": n_test, "auc": auc, "parameters": params},
        "budgets": budgets,
    }


def bundle_variants(search: SearchResult, auc: dict[str, float]) -> tuple[list[dict], dict[str, Path]]:
    """Manifest entries for every candidate and the files they need, stored once by content
    (candidates share most encoders)."""
    files: dict[str, Path] = {}
    entries = []
    for v in search.variants:
        paths = {}
        for m, path in v.encoders.items():
            name = f"encoders/{m}/{sha256_file(path)[:16]}.onnx"
            files[name] = path
            paths[m] = name
        summary = v.summary()
        entries.append({"name": v.name, "encoders": paths, "recipe": summary["encoders"], "fp32_nodes": summary["fp32_nodes"],
                        "val_auc": summary["val_auc"], "auc": auc.get(f"student_{v.name}"), "parity_bound": v.parity_bound,
                        "fallback": summary["fallback"],
                        "measured": v.measured, "passes": not search.selection.reasons[v.name],
                        "fails": search.selection.reasons[v.name]})
    return entries, files


def train_federated_or_central(
    teacher: Teacher, data: PreparedCases, val: PreparedCases, cfg: PipelineConfig, seed: int, work: Path,
    log: Callable[[str], None], device: str,
) -> None:
    """The teacher the product promises: trained federated with DW-FL (beta = 0.3) over the cohort's
    sites, each site training only on its own cases, one local epoch per round; or centrally."""
    if cfg.train.teacher_training == "central":
        train_teacher(teacher, data, val, cfg.train, seed, log, device)
        return
    if cfg.train.teacher_training != "federated":
        raise BadInput(f"teacher_training must be 'federated' or 'central', not {cfg.train.teacher_training!r}")
    sites = [Site(k, data.subset(np.flatnonzero(data.site == k)), val.subset(np.flatnonzero(val.site == k)))
             for k in range(cfg.n_sites)]
    sites = [s for s in sites if len(s.train)]
    spec = FederationSpec(sites=len(sites), rounds=cfg.train.teacher_epochs, device=device)
    work.mkdir(parents=True, exist_ok=True)
    log(f"teacher: federated over {len(sites)} sites ({', '.join(str(len(s.train)) for s in sites)} cases), "
        f"{spec.rounds} rounds of DW-FL (beta {spec.beta})")
    Federation(teacher, sites, spec, cfg.train, seed, work, log).run()


def run_pipeline(
    out: Path, cfg: PipelineConfig, seed: int = 0, signing_key: Path | None = None,
    model_version: str = "1", log: Callable[[str], None] = print, device: str = "cpu", init_checkpoint: Path | None = None,
    budgets: dict[str, float] | None = None, tolerance: float = DEFAULT_TOLERANCE, threads: int = 2,
    measure_cases: int = 40,
) -> PipelineResult:
    """Train, distill, export, build and measure the variants, sign the bundle. ``result.ok`` is
    False when no variant met accuracy and both budgets (the best one is still written)."""
    budgets = {**DEFAULT_BUDGETS, **(budgets or {})}
    if seed < 0:
        raise BadInput(f"seed must be >= 0, got {seed}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out}: exists and is not a directory")
    key, new_key_path = _signing_key(out, signing_key)  # fail on a bad key before hours of training
    torch.manual_seed(seed)
    timer = StepTimer()
    cohort = SyntheticCohort(SynthConfig(seed=seed, n_sites=cfg.n_sites, spec=cfg.input))
    splits = Splits.of(cfg)
    n_genes, n_classes = cfg.input.n_genes, len(cfg.classes)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".work-") as work_dir:
        work = Path(work_dir)
        pre = fit_preprocessing(cohort.iter_cases(0, min(cfg.train.stats_cases, cfg.train.train_cases)), cfg.input)
        data = PreparedCases(work / "train", cohort, pre, splits.train)
        val = PreparedCases(work / "val", cohort, pre, splits.val)
        timer.lap("prepare")
        teacher = Teacher(cfg.model, n_genes, n_classes, cfg.train.contrastive_temperature)
        if init_checkpoint is not None:
            loaded, skipped = load_pretrained(teacher, init_checkpoint)
            log(f"teacher: {loaded} tensors from {init_checkpoint}, {skipped} initialised fresh")
        train_federated_or_central(teacher, data, val, cfg, seed, work / "federation", log, device)
        timer.lap("teacher")
        student = distill(Student(cfg.model, n_genes, n_classes), teacher, data, val, cfg.train, seed, log, device)
        del data
        flops = {"teacher": count_flops(teacher, cfg), "student": count_flops(student, cfg)}
        timer.lap("distill")

        fp32 = export_student(student, pre, work / "fp32", seed)
        head_npz = save_head_weights(student.head, work / "head.npz")  # the clinic fine-tunes these in numpy
        log("exported ONNX encoders and head; parity with torch within 1e-4")
        timer.lap("export")
        builder = Builder({m: fp32[m] for m in MODALITIES}, fp32["head"], cohort, pre, splits.calib, val, work / "candidates")

        def request(v: Variant) -> Request:
            return Request({m: str(p) for m, p in v.encoders.items()}, str(fp32["head"]), pre.to_dict(), list(cfg.classes),
                           cfg.model.dim, seed, cfg.n_sites, cases=measure_cases, threads=threads)

        found = search(builder, request, tolerance, budgets, log)
        del builder, val
        timer.lap("quantize_and_choose")

        by_name = {v.name: v for v in found.variants}
        chosen = found.selection.chosen
        evaluated = dict.fromkeys(("fp32", "int8", chosen))
        models = {f"student_{n}": EdgeModel(by_name[n].encoders, fp32["head"], pre, list(cfg.classes), cfg.model.dim)
                  for n in evaluated}
        auc = evaluate(cohort, pre, splits.test, teacher, models, cfg.train.batch_size)
        del models
        timer.lap("evaluate")

        cpu = this_cpu()
        selection = {"chosen": chosen, "ok": found.selection.ok, "message": found.selection.message(),
                     "reference": "fp32", "reference_val_auc": round(found.reference_auc, 4), "tolerance": tolerance,
                     "measured_on": cpu.to_dict(), "cpu_class": cpu.cls, "threads": threads, "budgets": budgets}
        variants, encoder_files = bundle_variants(found, auc)
        files = {"head.onnx": fp32["head"], "head.npz": head_npz, **encoder_files}
        sizes = {"head": fp32["head"].stat().st_size}
        sizes.update({f"encoders_{v.name}": sum(p.stat().st_size for p in v.encoders.values()) for v in found.variants})
        params = {"teacher": count_parameters(teacher), "student": count_parameters(student)}
        body = manifest_body(cfg, seed, model_version, pre, auc, len(splits.test), params, variants, selection, budgets)
        bundle_dir = write_bundle(out / BUNDLE_DIR, files, body, key)
    public_key = default_public_key_path(bundle_dir)
    save_public_key(key.public_key(), public_key)
    if new_key_path is not None:
        save_private_key(key, new_key_path)
    checkpoint = io.BytesIO()
    torch.save({"teacher": teacher.state_dict(), "student": student.state_dict(), "config": cfg.name}, checkpoint)
    write_atomic(out / "checkpoints.pt", checkpoint.getvalue())
    timer.lap("bundle")
    result = PipelineResult(bundle_dir, public_key, auc, sizes, params, timer.seconds, flops,
                            [{k: v[k] for k in REPORTED} for v in variants], selection)
    write_atomic(out / "report.json", json.dumps(result.to_dict(), indent=2).encode())
    plot_candidates(result, out / "report.png")
    return result
