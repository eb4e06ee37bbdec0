"""Spatial harmonization, pure numpy: resampling to the bundle's voxel spacing and grid, tile crops.

Resampling is separable linear interpolation written as one small matrix per axis: the matrix maps
input voxel centres to output voxel centres (both centred on the volume's centre), so resampling,
centre cropping and padding happen in one step, and a series can be resampled slice by slice while
it is read (memory: the output grid plus one input slice).
"""

from __future__ import annotations

import numpy as np

from .errors import BadInput

AIR_HU = -1000.0


def interpolation_matrix(in_positions: np.ndarray, out_positions: np.ndarray) -> np.ndarray:
    """(n_out, n_in) linear interpolation weights from sorted input positions to output positions.
    Rows of output positions outside the input's extent (beyond half a voxel) are all zero."""
    n_in = len(in_positions)
    weights = np.zeros((len(out_positions), n_in), dtype=np.float64)
    if n_in == 1:
        weights[np.abs(out_positions - in_positions[0]) <= 0.5, 0] = 1.0
        return weights
    half_lo = (in_positions[1] - in_positions[0]) / 2
    half_hi = (in_positions[-1] - in_positions[-2]) / 2
    inside = (out_positions >= in_positions[0] - half_lo) & (out_positions <= in_positions[-1] + half_hi)
    clipped = np.clip(out_positions, in_positions[0], in_positions[-1])
    right = np.clip(np.searchsorted(in_positions, clipped, side="right"), 1, n_in - 1)
    left = right - 1
    span = in_positions[right] - in_positions[left]
    frac = np.where(span > 0, (clipped - in_positions[left]) / np.where(span > 0, span, 1.0), 0.0)
    rows = np.arange(len(out_positions))
    weights[rows, left] = 1.0 - frac
    weights[rows, right] += frac
    weights[~inside] = 0.0
    return weights


def centred_positions(n: int, spacing: float) -> np.ndarray:
    """Voxel centre coordinates (mm) of ``n`` voxels, centred on 0."""
    return (np.arange(n) - (n - 1) / 2.0) * spacing


def axis_matrix(n_in: int, spacing_in: float, n_out: int, spacing_out: float) -> np.ndarray:
    return interpolation_matrix(centred_positions(n_in, spacing_in), centred_positions(n_out, spacing_out))


def apply_matrix(weights: np.ndarray, values: np.ndarray, axis: int, fill: float) -> np.ndarray:
    """Resample ``values`` along ``axis``; output voxels outside the input get ``fill``."""
    moved = np.moveaxis(values, axis, 0)
    # Weights in the values' precision: float64 weights would upcast (copy) a float32 stack.
    out = np.tensordot(weights.astype(values.dtype, copy=False), moved, axes=(1, 0))
    coverage = weights.sum(1).reshape((-1,) + (1,) * (moved.ndim - 1))
    out = out + (1.0 - coverage) * fill
    return np.moveaxis(out, 0, axis)


class InPlaneResampler:
    """Resamples 2D slices (rows, cols) of one spacing to the target in-plane grid."""

    def __init__(self, shape: tuple[int, int], spacing: tuple[float, float], grid: tuple[int, int], target: tuple[float, float]) -> None:
        self.rows = axis_matrix(shape[0], spacing[0], grid[0], target[0]).astype(np.float32)
        self.cols = axis_matrix(shape[1], spacing[1], grid[1], target[1]).astype(np.float32)
        self.cover = np.outer(self.rows.sum(1), self.cols.sum(1))

    def __call__(self, image: np.ndarray, fill: float = AIR_HU) -> np.ndarray:
        out = self.rows @ image.astype(np.float32) @ self.cols.T
        return out + (1.0 - self.cover) * fill


def resample_volume(
    volume: np.ndarray, spacing: tuple[float, float, float], grid: tuple[int, int, int], target: tuple[float, float, float]
) -> np.ndarray:
    """(D, H, W) volume with ``spacing`` mm -> ``grid`` voxels of ``target`` mm, centred, air-padded."""
    if volume.shape == tuple(grid) and np.allclose(spacing, target):
        return volume.astype(np.float32, copy=False)
    plane = InPlaneResampler(volume.shape[1:], spacing[1:], grid[1:], target[1:])
    slices = np.stack([plane(s) for s in volume])
    zmat = axis_matrix(volume.shape[0], spacing[0], grid[0], target[0])
    return apply_matrix(zmat, slices, 0, AIR_HU).astype(np.float32)


def resample_slices(slices: np.ndarray, positions: np.ndarray, grid_d: int, target_d: float) -> np.ndarray:
    """Resample a stack of already in-plane-resampled slices at (sorted) ``positions`` mm along the
    slice normal to ``grid_d`` slices of ``target_d`` mm centred on the stack's centre."""
    centre = (positions[0] + positions[-1]) / 2.0
    zmat = interpolation_matrix(positions - centre, centred_positions(grid_d, target_d))
    return apply_matrix(zmat, slices, 0, AIR_HU).astype(np.float32)


def crop_tile(image: np.ndarray, tile: int, where: str = "tile") -> np.ndarray:
    """Centre crop of an RGB image to ``tile`` x ``tile``; tiles are never rescaled (that would change
    the apparent nuclear size), so an image smaller than a tile is refused."""
    h, w = image.shape[:2]
    if h < tile or w < tile:
        raise BadInput(f"{where}: image is {w}x{h} pixels, smaller than the model's {tile}x{tile} tile")
    top, left = (h - tile) // 2, (w - tile) // 2
    return np.ascontiguousarray(image[top : top + tile, left : left + tile])
