"""quantize_static with the recipe measured on this CPU class (DESIGN §7): QDQ, per-channel,
U8 activations / S8 weights, MinMax, reduce_range=True (without it logits drift ~10x more on
non-VNNI CPUs)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process


def quantize_int8(
    fp32_path: Path, out_path: Path, reader: CalibrationDataReader, nodes_to_exclude: list[str] | None = None
) -> Path:
    """Quantize ``fp32_path`` to ``out_path``; the FP32 file is left untouched."""
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
            calibrate_method=CalibrationMethod.MinMax,
            reduce_range=True,
            nodes_to_exclude=nodes_to_exclude or [],
        )
    return out_path
