"""Fits the bundle's harmonization statistics on training cases, streaming (sums, not samples)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from edge_runtime.preprocess import CTSpec, GenomicsSpec, PathologySpec, Preprocessing
from edge_runtime.synthetic import Case, InputSpec, gene_names

MIN_STD = 1e-3


class RunningMoments:
    """Mean and standard deviation from running float64 sums."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.n = 0
        self.total = np.zeros(shape)
        self.squares = np.zeros(shape)

    def add(self, total: np.ndarray, squares: np.ndarray, count: int = 1) -> None:
        """Add ``count`` samples given as their sum and their sum of squares."""
        self.n += count
        self.total += total
        self.squares += squares

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.total / max(self.n, 1)
        var = self.squares / max(self.n, 1) - mean**2
        return mean, np.maximum(np.sqrt(np.maximum(var, 0.0)), MIN_STD)


def fit_preprocessing(cases: Iterable[Case], spec: InputSpec) -> Preprocessing:
    colour = RunningMoments((3,))
    genes = RunningMoments((spec.n_genes,))
    for case in cases:
        for tile in case.tiles or []:
            px = tile.reshape(-1, 3).astype(np.float64) / 255.0
            colour.add(px.sum(0), (px**2).sum(0), count=len(px))
        if case.genomics is not None:
            logx = np.log1p(case.genomics.astype(np.float64))
            genes.add(logx, logx**2)
    c_mean, c_std = colour.mean_std()
    g_mean, g_std = genes.mean_std()
    return Preprocessing(
        ct=CTSpec(grid=spec.ct_grid, spacing_mm=spec.ct_spacing_mm),
        pathology=PathologySpec(tile=spec.tile, mean=tuple(c_mean.round(6)), std=tuple(c_std.round(6))),
        genomics=GenomicsSpec(genes=tuple(gene_names(spec.n_genes)), mean=tuple(g_mean.round(6)), std=tuple(g_std.round(6))),
    )
