import numpy as np
import pytest

from edge_runtime.errors import BadInput
from edge_runtime.preprocess import (
    CTSpec, GenomicsSpec, PathologySpec, Preprocessing, prepare_case, prepare_ct, prepare_genomics, prepare_tiles,
)
from edge_runtime.synthetic import Case

CT = CTSpec(grid=(2, 3, 4), hu_window=(-1000.0, 400.0))
PATH = PathologySpec(tile=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
GEN = GenomicsSpec(genes=("A", "B", "C"), mean=(1.0, 0.0, 2.0), std=(0.5, 1.0, 2.0))


def test_ct_window_maps_to_unit_range_and_clips():
    vol = np.full((2, 3, 4), -300.0, np.float32)
    vol[0, 0, 0], vol[1, 2, 3] = -3000.0, 3000.0
    x = prepare_ct(vol, CT)
    assert x.shape == (1, 1, 2, 3, 4) and x.dtype == np.float32
    assert x[0, 0, 0, 0, 0] == -1.0 and x[0, 0, 1, 2, 3] == 1.0
    assert x[0, 0, 0, 1, 1] == pytest.approx(0.0)  # -300 HU is the window's centre


def test_ct_wrong_grid_refused():
    with pytest.raises(BadInput, match="grid"):
        prepare_ct(np.zeros((2, 3, 5), np.float32), CT)


def test_tiles_normalized_channel_first():
    tiles = [np.full((4, 4, 3), 255, np.uint8), np.zeros((4, 4, 3), np.uint8)]
    x = prepare_tiles(tiles, PATH)
    assert x.shape == (2, 3, 4, 4)
    assert np.allclose(x[0], 2.0) and np.allclose(x[1], -2.0)
    with pytest.raises(BadInput, match="tile"):
        prepare_tiles([np.zeros((5, 4, 3), np.uint8)], PATH)


def test_genomics_log_zscore():
    values = np.expm1(np.array([1.0, 0.0, 4.0], np.float32))
    assert np.allclose(prepare_genomics(values, GEN), [[0.0, 0.0, 1.0]], atol=1e-6)
    for bad in (np.array([1.0, -1.0, 0.0]), np.array([1.0, np.nan, 0.0]), np.ones(4)):
        with pytest.raises(BadInput):
            prepare_genomics(bad, GEN)


def test_prepare_case_only_present_modalities_and_dict_roundtrip():
    pre = Preprocessing(CT, PATH, GEN)
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    case = Case("c", 0, 1, ct=None, tiles=[np.zeros((4, 4, 3), np.uint8)], genomics=None)
    assert set(prepare_case(case, pre)) == {"pathology"}


def test_malformed_preprocessing_refused():
    data = Preprocessing(CT, PATH, GEN).to_dict()
    data["genomics"]["mean"] = [1.0]
    with pytest.raises(BadInput, match="inconsistent"):
        Preprocessing.from_dict(data)
    del data["ct"]
    with pytest.raises(BadInput, match="malformed"):
        Preprocessing.from_dict(data)
