"""The export pipeline's stages (DESIGN §9), each over the work folder (see ``export.work``):

    train-teacher  WORK/teacher/   federated.pt (the Federation's checkpoint), rounds.jsonl, preprocessing.json
    distill        WORK/student.pt
    export         WORK/onnx/      ct / pathology / genomics / head .onnx (parity-checked), head.npz
    quantize       WORK/quantize/  INT8 encoders of the candidates; measured, chosen, test AUC in quantize.json
    bundle         OUT/bundle, OUT/bundle.pub, OUT/signing_key.pem (when new), report.json, report.png, checkpoints.pt

Every stage checks its options and the earlier stages' records before any work, and seeds its own
RNGs, so a stage run alone gives what it gives inside `pipeline`. `quantize` and `bundle` need no
training: rerun them with another tolerance, budget or candidate set and the teacher and student
stay as they are.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from edge_runtime import MODALITIES
from edge_runtime.bundle import default_public_key_path, write_bundle
from edge_runtime.cpuinfo import this_cpu
from edge_runtime.errors import BadInput
from edge_runtime.fsutil import sha256_file, temp_path, write_atomic
from edge_runtime.keys import generate_key, load_private_key, save_private_key, save_public_key
from edge_runtime.measure import MeasureSpec
from edge_runtime.metrics import roc_auc
from edge_runtime.model import EdgeModel
from edge_runtime.preprocess import Preprocessing
from edge_runtime.synthetic import SynthConfig, SyntheticCohort
from federation.aggregation import settings_of

from .candidates import Builder, check_variant_names, search
from .config import TEST_START, VAL_START, VARIANT_NAMES, PipelineConfig
from .data import PreparedCases, collate
from .federated import CHECKPOINT, Federation, FederationSpec, Site
from .head_weights import save_head_weights
from .models import Student, Teacher, count_flops, count_parameters
from .onnx_export import export_student
from .report import REPORTED, plot_candidates
from .stats import fit_preprocessing
from .train import distill, load_pretrained, positive_probability, train_teacher
from .work import Staged, Work

Log = Callable[[str], None]
DEFAULT_BUDGETS = {"mem_mb": 1800.0, "latency_ms": 200.0}
DEFAULT_TOLERANCE = 0.005  # AUC drop allowed against the FP32 student
MEASURE_CASES = 40
BUNDLE_DIR = "bundle"
SIGNING_KEY = "signing_key.pem"
WORK_DIR = "work"

TEACHER = f"teacher/{CHECKPOINT}"
PREPROCESSING = "teacher/preprocessing.json"
STUDENT = "student.pt"
ONNX = {m: f"onnx/{m}.onnx" for m in (*MODALITIES, "head")}
HEAD_NPZ = "onnx/head.npz"


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


def cohort_of(cfg: PipelineConfig, seed: int) -> SyntheticCohort:
    return SyntheticCohort(SynthConfig(seed=seed, n_sites=cfg.n_sites, spec=cfg.input))


class CaseCache:
    """Harmonized training / validation cases (memory-mapped) in a hidden temporary folder of the
    work folder, built the first time a stage asks: `pipeline` shares one across its stages, a
    stage run alone builds its own. Removed on exit (after a crash, by the next stage's sweep)."""

    def __init__(self, work_root: Path) -> None:
        self.folder = temp_path(Path(work_root) / "cases")
        self._sets: dict[tuple[str, str], PreparedCases] = {}

    def __enter__(self) -> "CaseCache":
        return self

    def __exit__(self, *_exc) -> None:
        self._sets.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

    def get(self, name: str, cohort: SyntheticCohort, pre: Preprocessing, indices: range) -> PreparedCases:
        key = (name, json.dumps([cohort.config.seed, pre.to_dict(), indices.start, indices.stop], sort_keys=True))
        if key not in self._sets:
            self._sets[key] = PreparedCases(self.folder / f"{name}-{len(self._sets)}", cohort, pre, indices)
        return self._sets[key]


@contextmanager
def _cases(shared: CaseCache | None, work: Work) -> Iterator[CaseCache]:
    if shared is not None:
        yield shared
        return
    with CaseCache(work.root) as own:
        yield own


def _save_torch(state: dict, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(path, buf.getvalue())


def _load_torch(path: Path, key: str) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not isinstance(state.get(key), dict):
        raise BadInput(f"{path}: holds no {key!r} state dict")
    return state[key]


def load_preprocessing(work: Work) -> Preprocessing:
    return Preprocessing.from_dict(json.loads(work.path(PREPROCESSING).read_text()))


def load_teacher(work: Work, cfg: PipelineConfig) -> Teacher:
    teacher = Teacher(cfg.model, cfg.input.n_genes, len(cfg.classes), cfg.train.contrastive_temperature)
    teacher.load_state_dict(_load_torch(work.path(TEACHER), "model"))
    return teacher.eval()


def load_student(work: Work, cfg: PipelineConfig) -> Student:
    student = Student(cfg.model, cfg.input.n_genes, len(cfg.classes))
    student.load_state_dict(_load_torch(work.path(STUDENT), "student"))
    return student.eval()


def check_seed(seed: int) -> None:
    if seed < 0:
        raise BadInput(f"seed must be >= 0, got {seed}")


def check_checkpoint(path: Path | None) -> None:
    if path is not None and not Path(path).is_file():
        raise BadInput(f"{path}: no such checkpoint file")


def train_federated_or_central(
    teacher: Teacher, data: PreparedCases, val: PreparedCases, cfg: PipelineConfig, seed: int, out: Path,
    log: Log, device: str,
) -> None:
    """The teacher the product promises: trained federated with DW-FL (``teacher_strategy``, beta = 0.3) over the cohort's
    sites, each site training only on its own cases, one local epoch per round (``out`` gets the
    federation's federated.pt and rounds.jsonl); or centrally (``out`` gets federated.pt alone)."""
    if cfg.train.teacher_training == "central":
        train_teacher(teacher, data, val, cfg.train, seed, log, device)
        _save_torch({"model": teacher.state_dict(), "strategy": "central"}, out / CHECKPOINT)
        return
    sites = [Site(k, data.subset(np.flatnonzero(data.site == k)), val.subset(np.flatnonzero(val.site == k)))
             for k in range(cfg.n_sites)]
    sites = [s for s in sites if len(s.train)]
    spec = FederationSpec(sites=len(sites), rounds=cfg.train.teacher_epochs, strategy=cfg.train.teacher_strategy, device=device)
    log(f"teacher: federated over {len(sites)} sites ({', '.join(str(len(s.train)) for s in sites)} cases), "
        f"{spec.rounds} rounds of {spec.strategy} (beta {spec.beta})")
    Federation(teacher, sites, spec, cfg.train, seed, out, log).run()


@torch.no_grad()
def teacher_test_auc(teacher: Teacher, cohort: SyntheticCohort, pre: Preprocessing, indices: range, batch_size: int) -> float:
    labels, scores = [], []
    for start in range(indices.start, indices.stop, batch_size):
        cases = list(cohort.iter_cases(start, min(batch_size, indices.stop - start)))
        labels.extend(c.label for c in cases)
        scores.extend(positive_probability(teacher, collate(cases, pre)).tolist())
    return round(roc_auc(np.asarray(labels), np.asarray(scores)), 4)


def student_test_auc(models: dict[str, EdgeModel], cohort: SyntheticCohort, indices: range) -> dict[str, float]:
    """AUC of each ONNX model on the held-out cases; every case generated once and run through the
    clinic's own `EdgeModel.predict`."""
    labels, scores = [], {name: [] for name in models}
    for case in cohort.iter_cases(indices.start, len(indices)):
        labels.append(case.label)
        for name, model in models.items():
            scores[name].append(model.predict(case).probability)
    return {name: round(roc_auc(np.asarray(labels), np.asarray(s)), 4) for name, s in scores.items()}


def network_teacher_stage(work: Work, cfg: PipelineConfig, *, folder: Path, norms: Path | None, log: Log = print) -> dict:
    """The teacher stage from a teacher trained over the network by hospitals (DESIGN §10): a
    verified version folder and a hospital's own normalisation layers; its preprocessing is the
    federation's (the student must see inputs as the teacher did). Nothing is trained here."""
    from safetensors.torch import load_file

    from .hospital import global_teacher, read_spec

    spec = read_spec(folder)
    if spec.config != cfg.name:
        raise BadInput(f"{folder}: a {spec.config!r} teacher; this pipeline runs --config {cfg.name}")
    work.check_folder()
    clock = time.perf_counter()
    work.begin("teacher")
    teacher, _, _, _ = global_teacher(folder, load_file(str(norms)) if norms is not None else None)
    pre = Preprocessing.from_dict(spec.preprocessing)
    log(f"teacher: the federation's version {folder.name} ({json.loads((folder / 'manifest.json').read_text())['model_version']}), "
        f"normalisation layers {'of ' + norms.name if norms else 'of the first version'}")
    with Staged(work, "teacher") as out:
        _save_torch({"model": teacher.state_dict(), "strategy": "network"}, out / CHECKPOINT)
        write_atomic(out / Path(PREPROCESSING).name, (json.dumps(pre.to_dict(), indent=2) + "\n").encode())
        facts = {"test_auc": teacher_test_auc(teacher.eval(), cohort_of(cfg, work.identity.seed), pre, Splits.of(cfg).test,
                                              cfg.train.batch_size),
                 "parameters": count_parameters(teacher), "flops": count_flops(teacher, cfg)}
    source = {"manifest_sha256": sha256_file(folder / "manifest.json"), "norms_sha256": sha256_file(norms) if norms else None}
    return work.commit("teacher", options={"device": "cpu", "init_checkpoint": None, "training": "network", "teacher": source},
                       inputs=[], outputs=work.files_under("teacher"), facts=facts, seconds=time.perf_counter() - clock)


def train_teacher_stage(
    work: Work, cfg: PipelineConfig, *, device: str = "cpu", init_checkpoint: Path | None = None, log: Log = print,
    cases: CaseCache | None = None,
) -> dict:
    """Fit the preprocessing on training cases, train the teacher as the config says (federated
    DW-FL over the cohort's sites by default); its test AUC, size and FLOPs go into the record."""
    seed = work.identity.seed
    check_seed(seed)
    check_checkpoint(init_checkpoint)
    if cfg.train.teacher_training not in ("federated", "central"):
        raise BadInput(f"teacher_training must be 'federated' or 'central', not {cfg.train.teacher_training!r}")
    settings_of(cfg.train.teacher_strategy)  # an unknown rule is refused before any work
    work.check_folder()
    clock = time.perf_counter()
    work.begin("teacher")
    torch.manual_seed(seed)
    cohort, splits = cohort_of(cfg, seed), Splits.of(cfg)
    pre = fit_preprocessing(cohort.iter_cases(0, min(cfg.train.stats_cases, cfg.train.train_cases)), cfg.input)
    teacher = Teacher(cfg.model, cfg.input.n_genes, len(cfg.classes), cfg.train.contrastive_temperature)
    if init_checkpoint is not None:
        loaded, skipped = load_pretrained(teacher, init_checkpoint)
        log(f"teacher: {loaded} tensors from {init_checkpoint}, {skipped} initialised fresh")
    with _cases(cases, work) as cache, Staged(work, "teacher") as out:
        data, val = cache.get("train", cohort, pre, splits.train), cache.get("val", cohort, pre, splits.val)
        train_federated_or_central(teacher, data, val, cfg, seed, out, log, device)
        write_atomic(out / Path(PREPROCESSING).name, (json.dumps(pre.to_dict(), indent=2) + "\n").encode())
        facts = {"test_auc": teacher_test_auc(teacher, cohort, pre, splits.test, cfg.train.batch_size),
                 "parameters": count_parameters(teacher), "flops": count_flops(teacher, cfg)}
    init = None if init_checkpoint is None else {"path": str(init_checkpoint), "sha256": sha256_file(Path(init_checkpoint))}
    return work.commit("teacher", options={"device": device, "init_checkpoint": init, "training": cfg.train.teacher_training},
                       inputs=[], outputs=work.files_under("teacher"), facts=facts, seconds=time.perf_counter() - clock)


def distill_stage(work: Work, cfg: PipelineConfig, *, device: str = "cpu", log: Log = print, cases: CaseCache | None = None) -> dict:
    """Distill the student from the teacher in WORK/teacher on the same training cases."""
    seed = work.identity.seed
    work.require("distill")
    clock = time.perf_counter()
    work.begin("distill")
    cohort, splits, pre = cohort_of(cfg, seed), Splits.of(cfg), load_preprocessing(work)
    teacher = load_teacher(work, cfg)
    # Its own seed: the student's initialisation does not depend on what the teacher's training drew,
    # so `distill` alone gives what it gives inside `pipeline`.
    torch.manual_seed(seed + 1)
    student = Student(cfg.model, cfg.input.n_genes, len(cfg.classes))
    with _cases(cases, work) as cache:
        data, val = cache.get("train", cohort, pre, splits.train), cache.get("val", cohort, pre, splits.val)
        student = distill(student, teacher, data, val, cfg.train, seed, log, device)
    _save_torch({"student": student.state_dict(), "config": cfg.name}, work.path(STUDENT))
    facts = {"parameters": count_parameters(student), "flops": count_flops(student, cfg)}
    return work.commit("distill", options={"device": device}, inputs=[TEACHER, PREPROCESSING], outputs=[STUDENT], facts=facts,
                       seconds=time.perf_counter() - clock)


def export_stage(work: Work, cfg: PipelineConfig, *, log: Log = print) -> dict:
    """The student's encoders and head as ONNX (parity with torch within 1e-4) and the head's weights."""
    work.require("export")
    clock = time.perf_counter()
    work.begin("export")
    pre, student = load_preprocessing(work), load_student(work, cfg)
    with Staged(work, "onnx") as out:
        export_student(student, pre, out, work.identity.seed)
        save_head_weights(student.head, out / Path(HEAD_NPZ).name)  # the clinic fine-tunes these in numpy
    log("exported ONNX encoders and head; parity with torch within 1e-4")
    return work.commit("export", options={}, inputs=[STUDENT, PREPROCESSING], outputs=[*ONNX.values(), HEAD_NPZ], facts={},
                       seconds=time.perf_counter() - clock)


@dataclass(frozen=True)
class QuantizeOptions:
    """The quantization recipe: which candidates to build, the accuracy tolerance, the budgets they
    are chosen against, and how they are measured here."""

    tolerance: float = DEFAULT_TOLERANCE
    budgets: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_BUDGETS))
    threads: int = 2
    variants: tuple[str, ...] = VARIANT_NAMES
    measure_cases: int = MEASURE_CASES

    def checked(self) -> "QuantizeOptions":
        if not 0.0 <= self.tolerance <= 1.0:
            raise BadInput(f"tolerance must be within 0 .. 1, got {self.tolerance}")
        budgets = {**DEFAULT_BUDGETS, **self.budgets}
        for name, value in budgets.items():
            if name not in DEFAULT_BUDGETS or not value > 0:
                raise BadInput(f"budget {name}={value!r}: must be one of {', '.join(DEFAULT_BUDGETS)} and > 0")
        if self.threads < 1 or self.measure_cases < 1:
            raise BadInput(f"threads and measure cases must be >= 1, got {self.threads} and {self.measure_cases}")
        return QuantizeOptions(self.tolerance, budgets, self.threads, check_variant_names(self.variants), self.measure_cases)


def quantize_stage(work: Work, cfg: PipelineConfig, options: QuantizeOptions | None = None, *, log: Log = print,
                   cases: CaseCache | None = None) -> dict:
    """Build the candidates from WORK/onnx, score them on validation cases (node fallback where INT8
    costs too much accuracy), measure each in a fresh process, choose; test AUC of FP32, INT8 and the
    chosen one. No training: a rerun with another recipe reuses the student as it is."""
    opts = (options or QuantizeOptions()).checked()
    seed = work.identity.seed
    work.require("quantize")
    clock = time.perf_counter()
    work.begin("quantize")
    cohort, splits, pre = cohort_of(cfg, seed), Splits.of(cfg), load_preprocessing(work)
    fp32 = {m: work.path(ONNX[m]) for m in MODALITIES}
    head = work.path(ONNX["head"])
    spec = MeasureSpec(str(head), pre.to_dict(), list(cfg.classes), cfg.model.dim, seed, cfg.n_sites, opts.measure_cases,
                       opts.threads)
    with _cases(cases, work) as cache, Staged(work, "quantize") as out:
        builder = Builder(fp32, head, cohort, pre, splits.calib, cache.get("val", cohort, pre, splits.val), out)
        found = search(builder, spec, tolerance=opts.tolerance, budgets=opts.budgets, log=log, names=opts.variants)
        by_name = {v.name: v for v in found.variants}
        chosen = found.selection.chosen
        models = {f"student_{n}": EdgeModel(by_name[n].encoders, head, pre, list(cfg.classes), cfg.model.dim)
                  for n in dict.fromkeys(("fp32", "int8", chosen)) if n in by_name}
        auc = student_test_auc(models, cohort, splits.test)
        del models

        def stored(path: Path) -> str:  # work-relative, where the file lies once `out` is renamed into place
            path = Path(path)
            return f"quantize/{path.relative_to(out)}" if path.is_relative_to(out) else str(path.relative_to(work.root))

        variants = []
        for v in found.variants:
            summary = v.summary()
            variants.append({"name": v.name, "encoders": {m: stored(p) for m, p in v.encoders.items()}, "recipe": summary["encoders"],
                             "fp32_nodes": summary["fp32_nodes"], "val_auc": summary["val_auc"], "auc": auc.get(f"student_{v.name}"),
                             "parity_bound": v.parity_bound, "fallback": summary["fallback"], "measured": v.measured,
                             "passes": not found.selection.reasons[v.name], "fails": found.selection.reasons[v.name]})
    cpu = this_cpu()
    selection = {"chosen": chosen, "ok": found.selection.ok, "message": found.selection.message(), "reference": "fp32",
                 "reference_val_auc": round(found.reference_auc, 4), "tolerance": opts.tolerance, "measured_on": cpu.to_dict(),
                 "cpu_class": cpu.cls, "threads": opts.threads, "budgets": opts.budgets}
    return work.commit("quantize", options={"tolerance": opts.tolerance, "budgets": opts.budgets, "threads": opts.threads,
                                            "variants": list(opts.variants), "measure_cases": opts.measure_cases},
                       inputs=[*ONNX.values(), PREPROCESSING], outputs=work.files_under("quantize"),
                       facts={"variants": variants, "selection": selection, "auc": auc}, seconds=time.perf_counter() - clock)


def signing_key_for(out: Path, key_path: Path | None):
    """(key, where to save it or None): the given key; else the one an earlier run saved in OUT, so a
    rerun of `bundle` keeps the signer clinics pinned; else a new one, saved in OUT after the bundle."""
    if key_path is not None:
        return load_private_key(key_path), None
    earlier = Path(out) / SIGNING_KEY
    if earlier.is_file():
        return load_private_key(earlier), None
    return generate_key(), earlier


def manifest_body(
    cfg: PipelineConfig, *, seed: int, model_version: str, pre: Preprocessing, auc: dict[str, float], n_test: int,
    params: dict, variants: list[dict], selection: dict,
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
        "budgets": selection["budgets"],
        "finetune": cfg.finetune.to_dict(),
    }


def check_out(out: Path) -> None:
    if Path(out).exists() and not Path(out).is_dir():
        raise BadInput(f"{out}: exists and is not a directory")


def bundle_stage(work: Work, cfg: PipelineConfig, *, out: Path, signing_key: Path | None = None, model_version: str = "1",
                 log: Log = print) -> PipelineResult:
    """Sign the bundle from the work folder (every candidate, the chosen one as default), the public
    key next to it, the report, and the torch checkpoints of teacher and student."""
    out = Path(out)
    check_out(out)
    records = work.require("bundle")
    key, new_key_path = signing_key_for(out, signing_key)  # a bad key fails before anything is written
    clock = time.perf_counter()
    work.begin("bundle")
    teacher, student, quant = (records[s]["facts"] for s in ("teacher", "distill", "quantize"))
    hashes = {name: digest for r in records.values() for name, digest in r["outputs"].items()}
    files = {"head.onnx": work.path(ONNX["head"]), "head.npz": work.path(HEAD_NPZ)}
    variants = []
    for v in quant["variants"]:
        names = {m: f"encoders/{m}/{hashes[p][:16]}.onnx" for m, p in v["encoders"].items()}  # shared encoders stored once
        files.update({names[m]: work.path(p) for m, p in v["encoders"].items()})
        variants.append({**v, "encoders": names})
    auc = {"teacher": teacher["test_auc"], **quant["auc"]}
    params = {"teacher": teacher["parameters"], "student": student["parameters"]}
    selection = quant["selection"]
    pre = load_preprocessing(work)
    body = manifest_body(cfg, seed=work.identity.seed, model_version=model_version, pre=pre, auc=auc,
                         n_test=cfg.train.test_cases, params=params, variants=variants, selection=selection)
    bundle_dir = write_bundle(out / BUNDLE_DIR, files, body, key)
    public_key = default_public_key_path(bundle_dir)
    save_public_key(key.public_key(), public_key)
    if new_key_path is not None:
        save_private_key(key, new_key_path)
    _save_torch({"teacher": _load_torch(work.path(TEACHER), "model"), "student": _load_torch(work.path(STUDENT), "student"),
                 "config": cfg.name}, out / "checkpoints.pt")
    sizes = {"head": work.path(ONNX["head"]).stat().st_size}
    sizes.update({f"encoders_{v['name']}": sum(work.path(p).stat().st_size for p in v["encoders"].values())
                  for v in quant["variants"]})
    seconds = {stage: r["seconds"] for stage, r in records.items()}
    seconds["bundle"] = round(time.perf_counter() - clock, 2)
    result = PipelineResult(bundle_dir, public_key, auc, sizes, params, seconds,
                            {"teacher": teacher["flops"], "student": student["flops"]},
                            [{k: v[k] for k in REPORTED} for v in variants], selection)
    write_atomic(out / "report.json", json.dumps(result.to_dict(), indent=2).encode())
    plot_candidates(result, out / "report.png")
    work.commit("bundle", options={"out": str(out), "model_version": model_version,
                                   "signing_key": str(signing_key or out / SIGNING_KEY)},
                inputs=list(hashes), outputs=[], facts={"bundle": str(bundle_dir), "ok": result.ok},
                seconds=time.perf_counter() - clock)
    return result
