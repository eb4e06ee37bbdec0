import numpy as np
import pytest

from edge_runtime.harmonize import (
    AIR_HU,
    axis_matrix,
    interpolation_matrix,
    resample_slices,
    resample_volume,
)


def test_identity_when_grid_and_spacing_match():
    vol = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
    assert resample_volume(vol, (2.0, 1.0, 1.0), (4, 5, 6), (2.0, 1.0, 1.0)) is vol
    w = axis_matrix(5, 1.0, 5, 1.0)
    assert np.allclose(w, np.eye(5))


def test_linear_ramp_is_reproduced_at_other_spacing():
    # A ramp in physical units stays the same ramp after resampling to a coarser grid.
    x_in = (np.arange(20) - 9.5) * 0.5
    vol = np.broadcast_to(x_in, (3, 4, 20)).astype(np.float32)
    out = resample_volume(vol, (1.0, 1.0, 0.5), (3, 4, 10), (1.0, 1.0, 1.0))
    x_out = (np.arange(10) - 4.5) * 1.0
    assert np.allclose(out[1, 2], x_out, atol=1e-5)


def test_outside_the_input_is_air():
    vol = np.zeros((2, 4, 4), np.float32)
    out = resample_volume(vol, (1.0, 1.0, 1.0), (2, 8, 8), (1.0, 1.0, 1.0))
    assert out[0, 0, 0] == AIR_HU and out[0, 4, 4] == 0.0
    assert np.count_nonzero(out[0] == 0.0) == 16


def test_rows_sum_to_one_inside():
    w = interpolation_matrix(np.array([0.0, 1.0, 3.0]), np.array([-1.0, 0.0, 0.5, 2.0, 3.0, 5.0]))
    assert np.allclose(w.sum(1), [0, 1, 1, 1, 1, 0])
    assert np.allclose(w[3], [0, 0.5, 0.5])


def test_uneven_slice_positions():
    slices = np.stack([np.full((2, 2), v, np.float32) for v in (0.0, 10.0, 30.0)])
    out = resample_slices(slices, np.array([0.0, 1.0, 3.0]), 3, 1.0)  # centre 1.5 -> out at 0.5, 1.5, 2.5
    assert np.allclose(out[:, 0, 0], [5.0, 15.0, 25.0])


@pytest.mark.parametrize("shape", [(1, 5, 5), (7, 3, 9)])
def test_constant_volume_stays_constant_inside(shape):
    vol = np.full(shape, 42.0, np.float32)
    out = resample_volume(vol, (2.0, 1.5, 0.7), (3, 4, 4), (2.0, 1.0, 1.0))
    assert np.all((np.isclose(out, 42.0, atol=1e-3)) | (np.isclose(out, AIR_HU)) | ((out > AIR_HU) & (out < 42.0)))
