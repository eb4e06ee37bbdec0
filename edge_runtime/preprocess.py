"""Harmonization of one case into model inputs; pure numpy functions.

The same functions serve the export side (training, calibration) and the clinic, so a model never
sees inputs prepared differently from the ones it was trained on. Their parameters live in the
bundle (DESIGN §6) as :class:`Preprocessing`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import BadInput
from .synthetic import Case


@dataclass(frozen=True)
class CTSpec:
    grid: tuple[int, int, int]
    hu_window: tuple[float, float] = (-1000.0, 400.0)


@dataclass(frozen=True)
class PathologySpec:
    tile: int
    mean: tuple[float, float, float]  # per channel, on [0, 1] intensities
    std: tuple[float, float, float]


@dataclass(frozen=True)
class GenomicsSpec:
    genes: tuple[str, ...]
    mean: tuple[float, ...]  # of log1p(expression), per gene
    std: tuple[float, ...]


@dataclass(frozen=True)
class Preprocessing:
    ct: CTSpec
    pathology: PathologySpec
    genomics: GenomicsSpec

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        try:
            ct, path, gen = data["ct"], data["pathology"], data["genomics"]
            spec = cls(
                ct=CTSpec(grid=tuple(int(v) for v in ct["grid"]), hu_window=tuple(float(v) for v in ct["hu_window"])),
                pathology=PathologySpec(
                    tile=int(path["tile"]),
                    mean=tuple(float(v) for v in path["mean"]),
                    std=tuple(float(v) for v in path["std"]),
                ),
                genomics=GenomicsSpec(
                    genes=tuple(str(g) for g in gen["genes"]),
                    mean=tuple(float(v) for v in gen["mean"]),
                    std=tuple(float(v) for v in gen["std"]),
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"preprocessing parameters are malformed: {exc!r}") from exc
        if len(spec.ct.grid) != 3 or len(spec.genomics.mean) != len(spec.genomics.genes):
            raise BadInput("preprocessing parameters are inconsistent (grid rank or gene statistics length)")
        return spec


def prepare_ct(volume_hu: np.ndarray, spec: CTSpec) -> np.ndarray:
    """HU volume on the bundle grid -> (1, 1, D, H, W) float32 in [-1, 1] after HU windowing."""
    if volume_hu.shape != tuple(spec.grid):
        raise BadInput(f"CT volume has shape {volume_hu.shape}, the model expects grid {tuple(spec.grid)}")
    lo, hi = spec.hu_window
    x = (np.clip(volume_hu, lo, hi) - (lo + hi) / 2) / ((hi - lo) / 2)
    return x.astype(np.float32)[None, None]


def prepare_tiles(tiles: list[np.ndarray], spec: PathologySpec) -> np.ndarray:
    """RGB uint8 tiles -> (N, 3, T, T) float32, colour-normalized with the bundle's statistics."""
    out = np.empty((len(tiles), 3, spec.tile, spec.tile), dtype=np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    for i, tile in enumerate(tiles):
        if tile.shape != (spec.tile, spec.tile, 3):
            raise BadInput(f"pathology tile has shape {tile.shape}, the model expects ({spec.tile}, {spec.tile}, 3)")
        x = tile.astype(np.float32) / 255.0
        out[i] = ((x - mean) / std).transpose(2, 0, 1)
    return out


def prepare_genomics(values: np.ndarray, spec: GenomicsSpec) -> np.ndarray:
    """Raw expression aligned to the bundle's gene list -> (1, G) float32 z-scores of log1p."""
    if values.shape != (len(spec.genes),):
        raise BadInput(f"expression vector has {values.shape} values, the model expects {len(spec.genes)} genes")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise BadInput("expression vector has negative or non-finite values")
    z = (np.log1p(values.astype(np.float64)) - np.asarray(spec.mean)) / np.asarray(spec.std)
    return z.astype(np.float32)[None]


def prepare_case(case: Case, spec: Preprocessing) -> dict[str, np.ndarray]:
    """Model inputs of the modalities present in ``case``; absent ones are simply not in the dict."""
    inputs: dict[str, np.ndarray] = {}
    if case.ct is not None:
        inputs["ct"] = prepare_ct(case.ct, spec.ct)
    if case.tiles:
        inputs["pathology"] = prepare_tiles(case.tiles, spec.pathology)
    if case.genomics is not None:
        inputs["genomics"] = prepare_genomics(case.genomics, spec.genomics)
    return inputs
