"""Rank a quantized graph's nodes by how much quantization hurts them, with ONNX Runtime's own
QDQ debugging tools (``onnxruntime.quantization.qdq_loss_debug``): activations of the FP32 and the
QDQ model on the same calibration inputs, compared tensor by tensor (SQNR, dB: lower is worse)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.quantization.qdq_loss_debug import (
    collect_activations,
    compute_activation_error,
    compute_weight_error,
    create_activation_matching,
    create_weight_matching,
    modify_model_output_intermediate_tensors,
)
from onnxruntime.quantization.shape_inference import quant_pre_process


def rank_nodes(
    fp32_path: Path, qdq_path: Path, reader: Callable[[], CalibrationDataReader], candidates: list[str]
) -> list[tuple[str, float]]:
    """``candidates`` (node names) from the most to the least sensitive, with each one's score: the
    lowest SQNR among the quantization noise of its activation input, its outputs and its weight."""
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)
        float_aug, qdq_aug = Path(tmp) / "float_aug.onnx", Path(tmp) / "qdq_aug.onnx"
        modify_model_output_intermediate_tensors(str(prepped), str(float_aug))
        modify_model_output_intermediate_tensors(str(qdq_path), str(qdq_aug))
        float_acts = collect_activations(str(float_aug), reader())
        qdq_acts = collect_activations(str(qdq_aug), reader())
        act_err = compute_activation_error(create_activation_matching(qdq_acts, float_acts))
        weight_err = compute_weight_error(create_weight_matching(str(prepped), str(qdq_path)))
        graph = onnx.load(str(prepped)).graph
    scores = {}
    for node in graph.node:
        if node.name not in candidates:
            continue
        tensors = [*node.input[:1], *node.output]  # its activation input and its outputs
        errs = [act_err[t]["qdq_err"] for t in tensors if t in act_err and "qdq_err" in act_err[t]]
        errs += [weight_err[w] for w in node.input[1:2] if w in weight_err]
        scores[node.name] = float(min(errs)) if errs else float("inf")
    return sorted(scores.items(), key=lambda kv: kv[1])
