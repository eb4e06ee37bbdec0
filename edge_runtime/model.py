"""Inference on the clinic: per-modality encoder sessions plus the head, from a verified bundle.

Absent modalities cost nothing: their encoders are not run, the head masks them out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import MODALITIES
from .bundle import Bundle
from .errors import BadInput, BundleError
from .preprocess import Preprocessing, prepare_case
from .synthetic import Case


@dataclass(frozen=True)
class Prediction:
    case_id: str
    probability: float  # of the positive (last) class
    label: str
    modalities: tuple[str, ...]
    latency_ms: float  # preprocessing + encoders + head
    warnings: tuple[str, ...] = ()
    stages_ms: dict[str, float] | None = None  # "preprocess", one per present modality's encoder, "head"

    @property
    def model_ms(self) -> float:
        """Encoders + head: the model's own time, without reading and resampling."""
        return self.latency_ms - (self.stages_ms or {}).get("preprocess", 0.0)

    def to_dict(self) -> dict:
        extra = {"warnings": list(self.warnings)} if self.warnings else {}
        return {
            "case_id": self.case_id,
            "probability": round(self.probability, 6),
            "label": self.label,
            "modalities": list(self.modalities),
            "latency_ms": round(self.latency_ms, 3),
            **extra,
        }


def session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Each session has its own intra-op pool; with spinning on, the idle workers of four small
    # sessions busy-wait on a 2-core PC and steal the core the running one needs. Measured here
    # (fp32 demo bundle, 60 full cases): model time p50/p95 8.1/13.9 ms spinning, 3.5/3.6 ms not.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class EdgeModel:
    """Encoder sessions for every modality plus the head; ``predict`` runs one case."""

    def __init__(
        self, encoder_files: dict[str, Path], head_file: Path, preprocessing: Preprocessing,
        classes: list[str], dim: int, threads: int = 2,
    ) -> None:
        opts = session_options(threads)
        providers = ["CPUExecutionProvider"]
        self.encoders = {m: ort.InferenceSession(str(encoder_files[m]), opts, providers=providers) for m in MODALITIES}
        self.head = ort.InferenceSession(str(head_file), opts, providers=providers)
        self.preprocessing = preprocessing
        self.classes = classes
        self.dim = dim
        self.head_params = None  # a fine-tuned head (numpy) replaces head.onnx when set
        self.variant: str | None = None  # the encoder variant's name, when made from a bundle
        self.variant_reason = ""  # why this variant (set by ClinicState.model_for)
        self.active_head = None  # which head runs and why (ClinicState.active_head, set by model_for)
        self.model_version = ""  # the bundle's model version, when made from a bundle (named in errors)

    def use_head_params(self, params: dict | None) -> None:
        """Evaluate the head in numpy with these weights (a clinic's fine-tuned head); None: head.onnx."""
        self.head_params = params

    @classmethod
    def from_bundle(cls, bundle: Bundle, variant: str | None = None, threads: int = 2,
                    head_params: dict | None = None) -> "EdgeModel":
        """Sessions for one encoder variant; only files the signed manifest lists (and that
        load_bundle therefore verified) are ever opened. ``head_params``: the numpy head to run
        (None: head.onnx); which head is active for a clinic is ClinicState.active_head's decision,
        and ClinicState.model_for is how the runtime gets its model."""
        manifest, where = bundle.manifest, bundle.root / "manifest.json"
        try:
            variants = {v["name"]: v for v in manifest["variants"]}
            name = variant or manifest["default_variant"]
            if name not in variants:
                raise BundleError(f"{bundle.root}: no encoder variant {name!r} (has {', '.join(map(str, variants))})")
            files = {m: variants[name]["encoders"][m] for m in MODALITIES}
            head, dim = manifest["head"]["file"], int(manifest["embedding_dim"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{where}: model description is malformed ({exc!r})") from exc
        for f in (*files.values(), head):
            if not isinstance(f, str) or f not in manifest["files"]:
                raise BundleError(f"{where}: {f!r} is not among the bundle's verified files")
        try:
            model = cls({m: bundle.path(f) for m, f in files.items()}, bundle.path(head), bundle.preprocessing,
                        bundle.classes, dim, threads)
        except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
                ort.capi.onnxruntime_pybind11_state.InvalidProtobuf) as exc:
            raise BundleError(f"{bundle.root}: ONNX Runtime cannot load the model ({str(exc)[:120]})") from exc
        model.variant = name
        model.model_version = str(bundle.model_version)
        model.use_head_params(head_params)
        return model

    def head_source(self) -> str:
        if self.active_head is not None:
            return self.active_head.source
        return "numpy head" if self.head_params is not None else "head.onnx"

    def embed(self, modality: str, x: np.ndarray) -> np.ndarray:
        """Encoder output for one case; several pathology tiles are averaged into one embedding."""
        (out,) = self.encoders[modality].run(None, {"x": x})
        return out.mean(axis=0)

    def logits(self, inputs: dict[str, np.ndarray], stages_ms: dict[str, float] | None = None) -> np.ndarray:
        if not inputs:
            raise BadInput("case has no usable modality")
        emb = np.zeros((1, len(MODALITIES), self.dim), dtype=np.float32)
        mask = np.zeros((1, len(MODALITIES)), dtype=np.float32)
        clock = time.perf_counter()
        for i, m in enumerate(MODALITIES):
            if m in inputs:
                emb[0, i] = self.embed(m, inputs[m])
                mask[0, i] = 1.0
                clock = _lap(stages_ms, m, clock)
        if self.head_params is not None:  # a head fine-tuned on this clinic's cases (numpy)
            from .finetune.head import forward

            with np.errstate(over="ignore", invalid="ignore"):  # a head gone wrong is refused by predict, not warned about
                logits = forward(self.head_params, emb, mask)
        else:
            (logits,) = self.head.run(None, {"embeddings": emb, "mask": mask})
        _lap(stages_ms, "head", clock)
        return logits[0]

    def predict(self, case: Case) -> Prediction:
        start = time.perf_counter()
        prepared = prepare_case(case, self.preprocessing)
        stages: dict[str, float] = {}
        _lap(stages, "preprocess", start)
        inputs = prepared.inputs
        logits = self.logits(inputs, stages)
        probs = softmax(logits) if np.all(np.isfinite(logits)) else logits
        if not np.all(np.isfinite(probs)):  # a head gone wrong (e.g. a poisoned global model) is never printed as NaN
            raise BadInput(f"{case.case_id}: the head gives non-finite scores (model {self.model_version or '?'}, "
                           f"{self.head_source()}); case not predicted")
        latency = (time.perf_counter() - start) * 1e3
        return Prediction(
            case_id=case.case_id,
            probability=float(probs[-1]),
            label=self.classes[int(np.argmax(probs))],
            modalities=tuple(m for m in MODALITIES if m in inputs),
            latency_ms=latency,
            warnings=tuple(prepared.warnings),
            stages_ms=stages,
        )


def _lap(stages: dict[str, float] | None, name: str, since: float) -> float:
    now = time.perf_counter()
    if stages is not None:
        stages[name] = (now - since) * 1e3
    return now


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()
