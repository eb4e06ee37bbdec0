"""Which nodes of an encoder graph a recipe keeps in FP32 (DESIGN §7: INT8 3D convolutions are slow
on every CPU measured, most of all the single-channel 3D stem)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
from onnxruntime.quantization.shape_inference import quant_pre_process


def _prepared(fp32_path: Path) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)
        return onnx.load(str(prepped))


def conv3d_nodes(fp32_path: Path) -> list[str]:
    """Names (as quantization sees them) of the Conv nodes with 5-D weights, in graph order."""
    model = _prepared(fp32_path)
    ranks = {t.name: len(t.dims) for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "Conv" and ranks.get(n.input[1]) == 5]


def quantizable_nodes(fp32_path: Path) -> list[str]:
    """Nodes whose weights quantization would turn to INT8 (Conv, Gemm, MatMul with an initializer)."""
    model = _prepared(fp32_path)
    weights = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and any(i in weights for i in n.input[1:2])]
