"""ONNX export with parity, and real static INT8 quantization of the exported encoders."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edge_runtime import MODALITIES
from edge_runtime.synthetic import SynthConfig, SyntheticCohort
from export.config import MICRO
from export.models import Student
from export.onnx_export import (
    ExportError,
    check_parity,
    encoder_input_shape,
    export_student,
)
from export.stats import fit_preprocessing
from quantize.calibration import StreamingReader
from quantize.static import quantize_int8


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    cohort = SyntheticCohort(SynthConfig(seed=0, spec=MICRO.input))
    pre = fit_preprocessing(cohort.iter_cases(0, 16), MICRO.input)
    student = Student(MICRO.model, MICRO.input.n_genes, 2).eval()
    out = tmp_path_factory.mktemp("onnx")
    return student, pre, export_student(student, pre, out, seed=0), cohort


def test_export_dynamic_batch_matches_torch(exported):
    student, pre, paths, _ = exported
    assert set(paths) == {*MODALITIES, "head"}
    for m in MODALITIES:
        x = torch.randn(7, *encoder_input_shape(m, pre))
        diff = check_parity(student.encoders[m], paths[m], {"x": x})
        assert diff <= 1e-4
        model = onnx.load(str(paths[m]))
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def test_parity_failure_is_refused(exported):
    student, pre, paths, _ = exported
    broken = Student(MICRO.model, MICRO.input.n_genes, 2).eval()  # other weights
    with pytest.raises(ExportError, match="differs from torch"):
        check_parity(broken.encoders["genomics"], paths["genomics"], {"x": torch.randn(2, len(pre.genomics.genes))})


def _calib(cohort, pre, modality, n):
    from edge_runtime.preprocess import prepare_case

    def make():
        for case in cohort.iter_cases(0, n):
            prepared = prepare_case(case, pre).inputs
            if modality in prepared:
                yield {"x": prepared[modality]}

    return make


@pytest.mark.parametrize("modality", MODALITIES)
def test_int8_is_real_qdq_and_close_to_fp32(exported, tmp_path, modality):
    _, pre, paths, cohort = exported
    reader = StreamingReader(_calib(cohort, pre, modality, 12))
    out = quantize_int8(paths[modality], tmp_path / "q.onnx", reader)
    assert reader.count > 0
    graph = onnx.load(str(out)).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert int8_weights, "weights are stored as INT8"
    x = np.random.default_rng(0).standard_normal((4, *encoder_input_shape(modality, pre))).astype(np.float32)
    ref = ort.InferenceSession(str(paths[modality]), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 0.2, f"INT8 drifted {rel:.3f} from FP32"
    assert out.stat().st_size < paths[modality].stat().st_size


def test_streaming_reader_is_lazy_and_rewinds():
    pulled = []

    def make():
        for i in range(5):
            pulled.append(i)
            yield {"x": np.full((1, 2), i, np.float32)}

    reader = StreamingReader(make)
    assert pulled == []
    assert reader.get_next()["x"][0, 0] == 0 and pulled == [0]
    reader.rewind()
    items = []
    while (item := reader.get_next()) is not None:
        items.append(int(item["x"][0, 0]))
    assert items == [0, 1, 2, 3, 4]
