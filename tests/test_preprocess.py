import warnings

import numpy as np
import pytest

from edge_runtime.errors import BadInput
from edge_runtime.preprocess import (
    CTSpec,
    GenomicsSpec,
    PathologySpec,
    Preprocessing,
    prepare_case,
    prepare_ct,
    prepare_genomics,
    prepare_tiles,
)
from edge_runtime.synthetic import Case

CT = CTSpec(grid=(2, 3, 4), spacing_mm=(1.0, 1.0, 1.0), hu_window=(-1000.0, 400.0))
PATH = PathologySpec(tile=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
GEN = GenomicsSpec(genes=("A", "B", "C"), mean=(1.0, 0.0, 2.0), std=(0.5, 1.0, 2.0))


def test_ct_window_maps_to_unit_range_and_clips():
    vol = np.full((2, 3, 4), -300.0, np.float32)
    vol[0, 0, 0], vol[1, 2, 3] = -3000.0, 3000.0
    x = prepare_ct(vol, (1.0, 1.0, 1.0), CT)
    assert x.shape == (1, 1, 2, 3, 4) and x.dtype == np.float32
    assert x[0, 0, 0, 0, 0] == -1.0 and x[0, 0, 1, 2, 3] == 1.0
    assert x[0, 0, 0, 1, 1] == pytest.approx(0.0)  # -300 HU is the window's centre


def test_ct_other_grid_is_resampled_and_bad_volumes_refused():
    x = prepare_ct(np.full((4, 6, 8), -300.0, np.float32), (0.5, 0.5, 0.5), CT)
    assert x.shape == (1, 1, 2, 3, 4) and np.allclose(x, 0.0, atol=1e-6)
    with pytest.raises(BadInput, match="spacing"):
        prepare_ct(np.zeros((2, 3, 4), np.float32), None, CT)
    with pytest.raises(BadInput, match="NaN"):
        prepare_ct(np.full((2, 3, 4), np.nan, np.float32), (1.0, 1.0, 1.0), CT)
    with pytest.raises(BadInput, match="dimensions"):
        prepare_ct(np.zeros((3, 4), np.float32), (1.0, 1.0, 1.0), CT)


def test_tiles_normalized_channel_first():
    tiles = [np.full((4, 4, 3), 255, np.uint8), np.zeros((4, 4, 3), np.uint8)]
    x = prepare_tiles(tiles, PATH)
    assert x.shape == (2, 3, 4, 4)
    assert np.allclose(x[0], 2.0) and np.allclose(x[1], -2.0)
    big = np.zeros((6, 8, 3), np.uint8)
    big[1:5, 2:6] = 255  # the centre 4x4 crop is all white
    assert np.allclose(prepare_tiles([big], PATH), 2.0)
    with pytest.raises(BadInput, match="smaller than"):
        prepare_tiles([np.zeros((3, 8, 3), np.uint8)], PATH)
    with pytest.raises(BadInput, match="RGB"):
        prepare_tiles([np.zeros((4, 4), np.uint8)], PATH)


def test_genomics_log_zscore_and_imputation():
    values = np.expm1(np.array([1.0, 0.0, 4.0], np.float32))
    z, missing = prepare_genomics(values, GEN)
    assert np.allclose(z, [[0.0, 0.0, 1.0]], atol=1e-6) and missing == 0
    z, missing = prepare_genomics(np.array([np.nan, 0.0, np.expm1(4.0)]), GEN)
    assert missing == 1 and z[0, 0] == 0.0
    for bad in (np.array([1.0, -1.0, 0.0]), np.array([1.0, np.inf, 0.0]), np.ones(4)):
        with pytest.raises(BadInput):
            prepare_genomics(bad, GEN)


def test_too_many_missing_genes_make_the_modality_absent_with_a_warning():
    pre = Preprocessing(CT, PATH, GEN)
    case = Case("c", 0, 1, tiles=[np.zeros((4, 4, 3), np.uint8)], genomics=np.array([np.nan, np.nan, 1.0]))
    prepared = prepare_case(case, pre)
    assert set(prepared.inputs) == {"pathology"}
    assert "2 of 3 genes missing" in prepared.warnings[0]
    case.genomics = np.array([np.nan, 1.0, 1.0])
    prepared = prepare_case(case, pre)
    assert set(prepared.inputs) == {"pathology", "genomics"} and "imputed" in prepared.warnings[0]


def test_prepare_case_only_present_modalities_and_dict_roundtrip():
    pre = Preprocessing(CT, PATH, GEN)
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    case = Case("c", 0, 1, ct=None, tiles=[np.zeros((4, 4, 3), np.uint8)], genomics=None)
    assert set(prepare_case(case, pre).inputs) == {"pathology"}


def test_malformed_preprocessing_refused():
    data = Preprocessing(CT, PATH, GEN).to_dict()
    data["genomics"]["mean"] = [1.0]
    with pytest.raises(BadInput, match="inconsistent"):
        Preprocessing.from_dict(data)
    del data["ct"]
    with pytest.raises(BadInput, match="malformed"):
        Preprocessing.from_dict(data)


def test_genomics_zscore_overflow_refused_without_a_warning():
    # Regression (issue 14 item 10b): an overflow in log/z-score printed a numpy RuntimeWarning and
    # returned inf; now one BadInput naming the gene, no warning.
    tiny = GenomicsSpec(genes=("A", "B", "C"), mean=(0.0, 0.0, 0.0), std=(1.0, 1e-300, 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BadInput, match="gene 'B' .* overflows its z-score"):
            prepare_genomics(np.array([1.0, 3e38, 1.0]), tiny)
