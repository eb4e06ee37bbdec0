"""Harmonization of one case into model inputs; pure numpy functions.

The same functions serve the export side (training, calibration) and the clinic, so a model never
sees inputs prepared differently from the ones it was trained on. Their parameters live in the
bundle (DESIGN §6) as :class:`Preprocessing`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import BadInput
from .harmonize import crop_tile, resample_volume
from .synthetic import Case


@dataclass(frozen=True)
class CTSpec:
    grid: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]  # (z, y, x) of the model grid
    hu_window: tuple[float, float] = (-160.0, 240.0)  # soft-tissue window (W400, L40)


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
    max_missing_fraction: float = 0.5  # above it the modality counts as absent


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
                ct=CTSpec(
                    grid=tuple(int(v) for v in ct["grid"]),
                    spacing_mm=tuple(float(v) for v in ct["spacing_mm"]),
                    hu_window=tuple(float(v) for v in ct["hu_window"]),
                ),
                pathology=PathologySpec(
                    tile=int(path["tile"]),
                    mean=tuple(float(v) for v in path["mean"]),
                    std=tuple(float(v) for v in path["std"]),
                ),
                genomics=GenomicsSpec(
                    genes=tuple(str(g) for g in gen["genes"]),
                    mean=tuple(float(v) for v in gen["mean"]),
                    std=tuple(float(v) for v in gen["std"]),
                    max_missing_fraction=float(gen.get("max_missing_fraction", 0.5)),
                ),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadInput(f"preprocessing parameters are malformed: {exc!r}") from exc
        if len(spec.ct.grid) != 3 or len(spec.ct.spacing_mm) != 3 or len(spec.genomics.mean) != len(spec.genomics.genes):
            raise BadInput("preprocessing parameters are inconsistent (grid rank or gene statistics length)")
        return spec


def prepare_ct(volume_hu: np.ndarray, spacing: tuple[float, float, float] | None, spec: CTSpec) -> np.ndarray:
    """HU volume -> resampled to the bundle grid and spacing -> HU window -> (1, 1, D, H, W) in [-1, 1]."""
    if volume_hu.ndim != 3:
        raise BadInput(f"CT volume has {volume_hu.ndim} dimensions, expected 3")
    if spacing is None:
        raise BadInput("CT volume has no voxel spacing")
    if not np.all(np.isfinite(volume_hu)):
        raise BadInput("CT volume has NaN or infinite values")
    vol = resample_volume(volume_hu, spacing, spec.grid, spec.spacing_mm)
    lo, hi = spec.hu_window
    x = (np.clip(vol, lo, hi) - (lo + hi) / 2) / ((hi - lo) / 2)
    return x.astype(np.float32)[None, None]


def prepare_tiles(tiles: list[np.ndarray], spec: PathologySpec) -> np.ndarray:
    """RGB uint8 tiles -> centre crop -> (N, 3, T, T) float32, colour-normalized with the bundle's statistics."""
    out = np.empty((len(tiles), 3, spec.tile, spec.tile), dtype=np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    for i, tile in enumerate(tiles):
        if tile.ndim != 3 or tile.shape[2] != 3:
            raise BadInput(f"pathology tile has shape {tile.shape}, expected an RGB image (H, W, 3)")
        x = crop_tile(tile, spec.tile).astype(np.float32) / 255.0
        out[i] = ((x - mean) / std).transpose(2, 0, 1)
    return out


def prepare_genomics(values: np.ndarray, spec: GenomicsSpec) -> tuple[np.ndarray, int]:
    """Raw expression aligned to the bundle's gene list (NaN = missing) -> (1, G) z-scores of log1p,
    missing genes imputed with the bundle mean (z = 0). Returns the inputs and the missing count."""
    if values.shape != (len(spec.genes),):
        raise BadInput(f"expression vector has {values.shape} values, the model expects {len(spec.genes)} genes")
    values = values.astype(np.float64)
    missing = np.isnan(values)
    present = values[~missing]
    if np.any(~np.isfinite(present)) or np.any(present < 0):
        raise BadInput("expression vector has negative or infinite values")
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # refused below, not warned about
        z = (np.log1p(np.where(missing, 0.0, values)) - np.asarray(spec.mean)) / np.asarray(spec.std)
        z[missing] = 0.0
        z32 = z.astype(np.float32)
    if not np.all(np.isfinite(z32)):
        bad = int(np.flatnonzero(~np.isfinite(z32))[0])
        raise BadInput(f"expression of gene {spec.genes[bad]!r} ({values[bad]:.3g}) overflows its z-score (bundle std {spec.std[bad]:.3g})")
    return z32[None], int(missing.sum())


@dataclass
class PreparedCase:
    inputs: dict[str, np.ndarray]  # only the modalities that are present and usable
    warnings: list[str]


def prepare_case(case: Case, spec: Preprocessing) -> PreparedCase:
    """Model inputs of the modalities present in ``case``; absent ones are simply not in the dict.
    Genomics with more than ``max_missing_fraction`` of the genes missing counts as absent."""
    inputs: dict[str, np.ndarray] = {}
    warnings = list(case.warnings)
    if case.ct is not None:
        inputs["ct"] = prepare_ct(case.ct, case.ct_spacing, spec.ct)
    if case.tiles:
        inputs["pathology"] = prepare_tiles(case.tiles, spec.pathology)
    if case.genomics is not None:
        z, n_missing = prepare_genomics(case.genomics, spec.genomics)
        fraction = n_missing / len(spec.genomics.genes)
        if fraction > spec.genomics.max_missing_fraction:
            warnings.append(
                f"genomics: {n_missing} of {len(spec.genomics.genes)} genes missing "
                f"(> {spec.genomics.max_missing_fraction:.0%}); modality treated as absent"
            )
        else:
            if n_missing:
                warnings.append(f"genomics: {n_missing} of {len(spec.genomics.genes)} genes missing, imputed")
            inputs["genomics"] = z
    return PreparedCase(inputs, warnings)
