"""Accuracy-aware fallback on a model built with one quantization-sensitive node, node ranking with
ORT's QDQ debugging tools, and calibration memory that does not grow with the calibration set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantize.calibration import StreamingReader
from quantize.fallback import accuracy_fallback
from quantize.graph import quantizable_nodes
from quantize.sensitivity import rank_nodes
from quantize.static import quantize_int8


def _sensitive_model(path: Path) -> Path:
    """x -> gemm1 -> relu -> gemm2 -> y. gemm2's weight has a row of huge values that never
    contribute (relu zeroes its input: gemm1's first bias is -100) but set every output channel's
    INT8 scale, so all its small weights round to zero: gemm2 alone is sensitive."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (16, 16)).astype(np.float32)
    b1 = np.zeros(16, np.float32)
    b1[0] = -100.0
    w2 = rng.normal(0, 0.3, (16, 8)).astype(np.float32)
    w2[0, :] = 200.0
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="gemm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="gemm2")]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (np.zeros(8, np.float32), "b2"))]
    graph = helper.make_graph(nodes, "sensitive", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path.write_bytes(model.SerializeToString())
    return path


X = np.random.default_rng(1).normal(0, 1, (64, 16)).astype(np.float32)


def _reader() -> StreamingReader:
    return StreamingReader(lambda: ({"x": X[i:i + 1]} for i in range(32)))


def _setup(tmp_path):
    fp32 = _sensitive_model(tmp_path / "fp32.onnx")
    ref = ort.InferenceSession(str(fp32)).run(None, {"x": X})[0]
    tried = []

    def quantize(excluded: list[str]) -> Path:
        tried.append(list(excluded))
        return quantize_int8(fp32, tmp_path / f"q{len(tried)}.onnx", _reader(), excluded)

    def score(model: Path) -> float:  # higher is better: minus the relative output error
        out = ort.InferenceSession(str(model)).run(None, {"x": X})[0]
        return -float(np.abs(out - ref).mean() / np.abs(ref).mean())

    def rank(model: Path) -> list[str]:
        return [n for n, _ in rank_nodes(fp32, model, _reader, quantizable_nodes(fp32))]

    return fp32, quantize, score, rank, tried


def test_ranking_puts_the_sensitive_node_first(tmp_path):
    fp32, quantize, _, _, _ = _setup(tmp_path)
    ranked = rank_nodes(fp32, quantize([]), _reader, quantizable_nodes(fp32))
    assert [n for n, _ in ranked] == ["gemm2", "gemm1"]
    assert ranked[0][1] < ranked[1][1] - 10, "dB of quantization noise: far worse for gemm2"


def test_fallback_stops_within_tolerance_after_the_sensitive_node(tmp_path):
    _, quantize, score, rank, tried = _setup(tmp_path)
    result = accuracy_fallback(quantize, score, rank, reference=0.0, tolerance=0.05)
    assert result.excluded == ["gemm2"]
    assert result.within_tolerance and result.score > -0.05
    assert result.history[0]["score"] < -0.5, "fully quantized, the model was broken"
    assert tried == [[], ["gemm2"]]


def test_fallback_does_nothing_when_already_within_tolerance(tmp_path):
    _, quantize, score, _, tried = _setup(tmp_path)

    def rank(_model):
        raise AssertionError("no ranking needed")

    result = accuracy_fallback(quantize, score, rank, reference=0.0, tolerance=2.0)
    assert result.excluded == [] and tried == [[]]


def test_fallback_gives_up_at_the_limit(tmp_path):
    _, quantize, score, _, _ = _setup(tmp_path)
    result = accuracy_fallback(quantize, score, lambda _m: ["gemm1", "gemm2"], reference=0.0, tolerance=0.05, max_excluded=1)
    assert result.excluded == ["gemm1"] and not result.within_tolerance


CALIBRATE = """
import json, sys
import numpy as np
from pathlib import Path
from onnx import TensorProto, helper, numpy_helper
from quantize.calibration import StreamingReader
from quantize.static import quantize_int8
from edge_runtime.profiling import peak_rss_mb
n, method, folder = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
rng = np.random.default_rng(0)
w1 = rng.normal(0, 0.1, (16, 8, 3, 3)).astype(np.float32)
w2 = rng.normal(0, 0.1, (16, 16, 3, 3)).astype(np.float32)
nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="c1"),
         helper.make_node("Relu", ["a"], ["b"], name="r1"),
         helper.make_node("Conv", ["b", "w2"], ["y"], pads=[1, 1, 1, 1], name="c2")]
graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 96, 96])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 96, 96])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 9
(folder / "f.onnx").write_bytes(model.SerializeToString())
cases = lambda: ({"x": np.random.default_rng([1, i]).normal(0, 1, (1, 8, 96, 96)).astype(np.float32)} for i in range(n))
quantize_int8(folder / "f.onnx", folder / f"q-{method}-{n}.onnx", StreamingReader(cases), method=method)
print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
"""


def _calibration_peak(tmp_path: Path, n: int, method: str) -> float:
    proc = subprocess.run([sys.executable, "-c", CALIBRATE, str(n), method, str(tmp_path)], capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]


@pytest.mark.parametrize("method", ["minmax"])
def test_streaming_calibration_memory_is_flat(tmp_path, method):
    """Each case's activations are about 1.5 MB: 120 cases held at once would add about 180 MB."""
    small, large = _calibration_peak(tmp_path, 8, method), _calibration_peak(tmp_path, 120, method)
    assert large - small < 25, (small, large)
    # The same measurement sees growth where a calibrator does keep every case (ORT's Entropy):
    # the check above could fail.
    entropy_large = _calibration_peak(tmp_path, 120, "entropy")
    assert entropy_large - small > 80, (small, entropy_large)
