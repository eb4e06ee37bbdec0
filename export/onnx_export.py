"""Student -> per-modality encoder graphs + head graph (ONNX, dynamo exporter), with a parity check."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from edge_runtime import MODALITIES
from edge_runtime.preprocess import Preprocessing

from .models import Student

PARITY_ATOL = 1e-4
OPSET = 18


class ExportError(RuntimeError):
    """The exported graph does not reproduce the torch module."""


class _Head(nn.Module):
    def __init__(self, student: Student) -> None:
        super().__init__()
        self.head = student.head

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(embeddings, mask)


def encoder_input_shape(modality: str, pre: Preprocessing) -> tuple[int, ...]:
    """Shape of one case's encoder input, without the batch axis."""
    return {
        "ct": (1, *pre.ct.grid),
        "pathology": (3, pre.pathology.tile, pre.pathology.tile),
        "genomics": (len(pre.genomics.genes),),
    }[modality]


def export_graph(module: nn.Module, examples: dict[str, torch.Tensor], output: str, path: Path) -> None:
    """Export with a dynamic batch axis on every input, weights inside the file."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    module.eval()
    # The exporter logs and warns about things that do not concern these graphs (torchvision ops,
    # deprecated pytree classes, axis renaming); the parity check is what tells a good export.
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                tuple(examples.values()),
                str(path),
                dynamo=True,
                verbose=False,
                external_data=False,
                opset_version=OPSET,
                input_names=list(examples),
                output_names=[output],
                dynamic_shapes=tuple({0: batch} for _ in examples),
            )
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)


def check_parity(module: nn.Module, path: Path, inputs: dict[str, torch.Tensor], atol: float = PARITY_ATOL) -> float:
    """Max |torch - onnxruntime| on ``inputs``; raises ExportError above ``atol``."""
    with torch.no_grad():
        expected = module(*inputs.values()).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
    diff = float(np.max(np.abs(got - expected)))
    if not np.isfinite(diff) or diff > atol:
        raise ExportError(f"{path}: ONNX output differs from torch by {diff:.3g} (limit {atol:g})")
    return diff


def export_student(student: Student, pre: Preprocessing, out_dir: Path, seed: int) -> dict[str, Path]:
    """Write ``{modality}.onnx`` encoders and ``head.onnx``; parity-check each on fresh random inputs
    at a batch size different from the export example (so the dynamic axis is exercised too)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    student.eval()
    paths: dict[str, Path] = {}
    for m in MODALITIES:
        shape = encoder_input_shape(m, pre)
        path = out_dir / f"{m}.onnx"
        export_graph(student.encoders[m], {"x": torch.randn(2, *shape, generator=gen)}, "embedding", path)
        check_parity(student.encoders[m], path, {"x": torch.randn(3, *shape, generator=gen)})
        paths[m] = path
    head, dim = _Head(student), student.dim

    def head_inputs(n: int) -> dict[str, torch.Tensor]:
        mask = (torch.rand(n, len(MODALITIES), generator=gen) > 0.4).float()
        mask[:, 0] = 1.0  # never an empty case
        return {"embeddings": torch.randn(n, len(MODALITIES), dim, generator=gen) * mask[..., None], "mask": mask}

    paths["head"] = out_dir / "head.onnx"
    export_graph(head, head_inputs(2), "logits", paths["head"])
    check_parity(head, paths["head"], head_inputs(5))
    return paths
