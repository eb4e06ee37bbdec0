"""quantize_static with the recipe measured on this CPU class (DESIGN §7): QDQ, per-channel,
U8 activations / S8 weights, reduce_range=True (without it logits drift ~10x more on non-VNNI
CPUs); MinMax by default, Entropy and Percentile on request."""

from __future__ import annotations

import tempfile
from pathlib import Path

from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
# MinMax keeps only each calibrated tensor's per-case min and max (the augmented ReduceMin/ReduceMax
# outputs; the model's own outputs are dropped), so its memory hardly grows with the cases that
# stream through. Its CalibMaxIntermediateOutputs option would bound even that, but in ORT 1.32 it
# clears the buffered ranges without merging them (onnxruntime#18893; fix PR #32577 still open):
# calibration would silently see only the last chunk, so it is not used. ORT's histogram
# calibrators (Entropy, Percentile) keep every case's full activations until the end: the pipeline
# gives them a bounded calibration set.


def quantize_int8(
    fp32_path: Path, out_path: Path, reader: CalibrationDataReader, nodes_to_exclude: list[str] | None = None,
    method: str = "minmax",
) -> Path:
    """Quantize ``fp32_path`` to ``out_path``; the FP32 file is left untouched."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}: choose one of {', '.join(METHODS)}")
    with tempfile.TemporaryDirectory() as tmp:
        # Shape inference + graph optimization first, as ORT recommends before static quantization.
        # ONNX's own shape inference suffices for these CNN/MLP graphs; ORT's symbolic one is meant
        # for transformers and trips over the pooled-feature Concat.
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)
        quantize_static(
            str(prepped),
            str(out_path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=METHODS[method],
            reduce_range=True,
            nodes_to_exclude=nodes_to_exclude or [],
        )
    return out_path

