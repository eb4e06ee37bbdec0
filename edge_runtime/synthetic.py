"""Deterministic synthetic multimodal cases (DESIGN §2), numpy only.

Every case is a pure function of (seed, case index): cases can be streamed in any order, on any
machine, and never need a whole dataset in memory. A latent disease factor ``u`` (shifted by the
label) drives a lesion in CT, nuclei density and size in pathology and a gene module in genomics;
each modality sees it through its own independent noise, so each is only partly informative and
fusing them beats any single one. Sites differ (non-IID): label prevalence, scanner calibration and
noise, stain colour, genomics batch effect and which modalities they have.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from . import MODALITIES
from .errors import BadInput

# Strength of the disease signal: latent u = LATENT_SHIFT * (2*label - 1) + N(0, LATENT_SD), and
# each modality observes f_m = u + N(0, MODALITY_SD).
LATENT_SHIFT = 0.7
LATENT_SD = 0.4
MODALITY_SD = 1.0
TISSUE_HU = 40.0
CT_FIELD_OF_VIEW_MM = (160.0, 320.0, 320.0)  # z, y, x
LESION_CONTRAST_HU = 90.0


@dataclass(frozen=True)
class InputSpec:
    """Shapes of the model inputs: CT grid (D, H, W), square tile side, number of genes."""

    ct_grid: tuple[int, int, int] = (32, 128, 128)
    tile: int = 224
    n_genes: int = 2000

    @property
    def ct_spacing_mm(self) -> tuple[float, float, float]:
        """Voxel spacing (z, y, x) that spreads the grid over a fixed field of view."""
        return tuple(float(f) / n for f, n in zip(CT_FIELD_OF_VIEW_MM, self.ct_grid))


@dataclass(frozen=True)
class SiteProfile:
    prevalence: float
    ct_scale: float
    ct_offset_hu: float
    ct_noise_hu: float
    stain_shift: tuple[float, float, float]
    batch_sd: float
    p_missing: tuple[float, float, float]  # per modality, in MODALITIES order


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 0
    n_sites: int = 4
    spec: InputSpec = field(default_factory=InputSpec)
    label_alpha: float | None = None  # Dirichlet (Beta) label skew across sites; None: mild default skew


@dataclass
class Case:
    """One case as a clinic would have it: HU volume, RGB tiles, raw expression values."""

    case_id: str
    site: int | str
    label: int
    ct: np.ndarray | None = None  # float32 (D, H, W), Hounsfield units
    ct_spacing: tuple[float, float, float] | None = None  # mm, (z, y, x)
    tiles: list[np.ndarray] | None = None  # uint8 (H, W, 3) each
    genomics: np.ndarray | None = None  # float32 (G,), raw expression aligned to the gene list, NaN = missing
    warnings: list[str] = field(default_factory=list)
    risk: float | None = None  # synthetic only: the latent disease factor, an auxiliary (multi-task) target

    @property
    def modalities(self) -> tuple[str, ...]:
        present = {"ct": self.ct is not None, "pathology": bool(self.tiles), "genomics": self.genomics is not None}
        return tuple(m for m in MODALITIES if present[m])


_CASE_ID = re.compile(r"^(?:case-)?(\d{1,9})$")


def case_id(index: int) -> str:
    return f"case-{index:06d}"


def parse_case_id(text: str) -> int:
    """'case-000042' or '42' -> 42."""
    match = _CASE_ID.match(text.strip())
    if not match:
        raise BadInput(f"synthetic case id {text!r} is not of the form case-NNNNNN or a number")
    return int(match.group(1))


def gene_names(n_genes: int) -> list[str]:
    return [f"GENE{i:05d}" for i in range(n_genes)]


def site_profiles(config: SynthConfig) -> list[SiteProfile]:
    """Per-site differences, fixed by the seed. The first four sites follow a hand-made pattern
    of missing modalities (one without CT scanner, one without slides, one without a lab)."""
    patterns = [(0.05, 0.05, 0.05), (0.6, 0.1, 0.1), (0.1, 0.6, 0.1), (0.1, 0.1, 0.6)]
    profiles = []
    for k in range(config.n_sites):
        rng = np.random.default_rng([config.seed, 1, k])
        p_missing = patterns[k] if k < len(patterns) else tuple(float(x) for x in rng.uniform(0.0, 0.5, 3))
        profiles.append(
            SiteProfile(
                prevalence=_prevalence(rng, config.label_alpha),
                ct_scale=float(rng.uniform(0.9, 1.1)),
                ct_offset_hu=float(rng.normal(0.0, 15.0)),
                ct_noise_hu=float(rng.uniform(6.0, 14.0)),
                stain_shift=tuple(float(x) for x in rng.normal(0.0, 12.0, 3)),
                batch_sd=float(rng.uniform(0.1, 0.4)),
                p_missing=p_missing,
            )
        )
    return profiles


DEPLOYMENT_SITE_BASE, DEPLOYMENT_CLINICS = 1_000, 64  # site indices of deployment clinics: one per (seed, clinic)


def deployment_site(seed: int, clinic: int) -> SiteProfile:
    """A primary-care clinic of the deployment population (benchmarks/federation_gain.py, the
    federation demo), fixed before any method was compared. Centred on the shifted site of
    benchmarks/finetune_utility.py: an older, noisier scanner generation (CT scale 1.1-1.3, offset
    +40 HU +- 20, noise 10-20 HU), another stain protocol (shift (25, -20, 15) +- 10 per channel),
    stronger genomics batch effects (sd 0.5-0.9), lower prevalence than the hospital cohort (10-30 %)
    and modalities missing at random (0-50 % each): a shared shift plus each clinic's own."""
    rng = np.random.default_rng([seed, 17, clinic])
    return SiteProfile(
        prevalence=float(rng.uniform(0.10, 0.30)),
        ct_scale=float(rng.uniform(1.1, 1.3)),
        ct_offset_hu=float(rng.normal(40.0, 20.0)),
        ct_noise_hu=float(rng.uniform(10.0, 20.0)),
        stain_shift=tuple(float(x) for x in np.array([25.0, -20.0, 15.0]) + rng.normal(0.0, 10.0, 3)),
        batch_sd=float(rng.uniform(0.5, 0.9)),
        p_missing=tuple(float(x) for x in rng.uniform(0.0, 0.5, 3)),
    )


def _prevalence(rng: np.random.Generator, alpha: float | None) -> float:
    if alpha is None:
        return float(rng.uniform(0.25, 0.6))
    # Label skew as in federated benchmarks: class proportions ~ Dirichlet(alpha), clipped so that
    # every site still has both classes.
    return float(np.clip(rng.dirichlet([alpha, alpha])[1], 0.05, 0.95))


@dataclass(frozen=True)
class _GeneTable:
    base: np.ndarray  # log-expression per gene
    module: np.ndarray  # indices of the disease gene module


def _gene_table(config: SynthConfig) -> _GeneTable:
    n = config.spec.n_genes
    rng = np.random.default_rng([config.seed, 2])
    size = max(4, n // 50)
    return _GeneTable(base=rng.normal(2.0, 1.0, n), module=rng.choice(n, size=size, replace=False))


def latent_draws(rng: np.random.Generator, prof: "SiteProfile") -> tuple[int, float, np.ndarray, np.ndarray]:
    """A case's first draws on its stream: label, latent disease factor u, per-modality signal f and
    which modalities are present (benchmarks score the oracle and skip the rendering with these)."""
    label = int(rng.random() < prof.prevalence)
    latent = LATENT_SHIFT * (2 * label - 1) + rng.normal(0.0, LATENT_SD)
    signal = latent + rng.normal(0.0, MODALITY_SD, 3)
    present = rng.random(3) >= np.asarray(prof.p_missing)
    if not present.any():
        present[rng.integers(3)] = True
    return label, float(latent), signal, present


def observed_oracle(signal: np.ndarray, present: np.ndarray) -> float:
    """The best score from the modalities a case has, before any site distortion: given the label,
    the present signals f_m = u + e_m are Gaussian with covariance MODALITY_SD² I + LATENT_SD² 11ᵀ, so
    the log likelihood ratio is 2 LATENT_SHIFT Σ_present f_m / (MODALITY_SD² + k LATENT_SD²)."""
    k = int(present.sum())
    return float(2 * LATENT_SHIFT * signal[present].sum() / (MODALITY_SD ** 2 + k * LATENT_SD ** 2))


class SyntheticCohort:
    """Streams cases of a synthetic multi-site cohort. Cheap to create; holds no cases."""

    def __init__(self, config: SynthConfig | None = None) -> None:
        self.config = config or SynthConfig()
        if self.config.n_sites < 1:
            raise BadInput(f"n_sites must be >= 1, got {self.config.n_sites}")
        self.sites = site_profiles(self.config)
        self._genes = _gene_table(self.config)

    def add_deployment_site(self, seed: int, clinic: int) -> int:
        """Make deployment clinic ``clinic`` of draw ``seed`` (deployment_site) a site of this cohort;
        its site index, which also seeds its own genomics batch effect."""
        index = DEPLOYMENT_SITE_BASE + seed * DEPLOYMENT_CLINICS + clinic
        if not isinstance(self.sites, dict):
            self.sites = dict(enumerate(self.sites))
        self.sites[index] = deployment_site(seed, clinic)
        return index

    def draws(self, index: int, site: int | None = None) -> tuple[int, int, float, np.ndarray, np.ndarray]:
        """(site, label, latent u, per-modality signal f, present mask) of case ``index``: what the case is
        rendered from, without rendering it (benchmarks score the oracles with these)."""
        rng = np.random.default_rng([self.config.seed, 0, index])
        site = int(rng.integers(self.config.n_sites)) if site is None else site
        return (site, *latent_draws(rng, self.sites[site]))

    def case(self, index: int, site: int | None = None) -> Case:
        """The case with this index; ``site`` pins it to one site (federated simulations)."""
        site, label, latent, signal, present = self.draws(index, site)
        prof = self.sites[site]
        # Each modality draws from its own stream so that dropping one leaves the others unchanged.
        streams = [np.random.default_rng([self.config.seed, 3, index, m]) for m in range(3)]
        spec = self.config.spec
        return Case(
            case_id=case_id(index),
            site=site,
            label=label,
            ct=_ct_volume(streams[0], spec, prof, signal[0]) if present[0] else None,
            ct_spacing=spec.ct_spacing_mm if present[0] else None,
            tiles=[_tile(streams[1], spec, prof, signal[1])] if present[1] else None,
            genomics=_expression(streams[2], self._genes, prof, site, self.config.seed, signal[2]) if present[2] else None,
            risk=float(latent),
        )

    def iter_cases(self, start: int, count: int, site: int | None = None) -> Iterator[Case]:
        for index in range(start, start + count):
            yield self.case(index, site)


def _ct_volume(rng: np.random.Generator, spec: InputSpec, prof: SiteProfile, f: float) -> np.ndarray:
    d, h, w = spec.ct_grid
    z, y, x = np.ogrid[:d, :h, :w]
    body = ((y - h / 2) / (0.42 * h)) ** 2 + ((x - w / 2) / (0.45 * w)) ** 2 < 1.0
    # Low-frequency tissue texture: coarse noise repeated up to the grid.
    coarse = rng.normal(0.0, 8.0, (max(1, d // 4), max(1, h // 8), max(1, w // 8)))
    texture = np.repeat(np.repeat(np.repeat(coarse, 4, 0), 8, 1), 8, 2)[:d, :h, :w]
    texture = np.pad(texture, [(0, d - texture.shape[0]), (0, h - texture.shape[1]), (0, w - texture.shape[2])], mode="edge")
    vol = np.where(body, TISSUE_HU + texture, -1000.0)
    # The lesion: its radius grows with the disease signal (in-plane voxels, scaled to the grid).
    radius = float(np.clip(14.0 + 5.0 * f, 4.0, 30.0)) * h / 128.0
    rz = max(radius * d / h, 0.75)
    cz, cy, cx = rng.uniform(0.3, 0.7) * d, rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
    lesion = ((z - cz) / rz) ** 2 + ((y - cy) / radius) ** 2 + ((x - cx) / radius) ** 2 < 1.0
    # Lesion enhancement also grows with the signal (contrast uptake), within a plausible range.
    vol = vol + float(np.clip(LESION_CONTRAST_HU + 30.0 * f, 30.0, 200.0)) * lesion
    vol = prof.ct_scale * vol + prof.ct_offset_hu + rng.normal(0.0, prof.ct_noise_hu, vol.shape)
    return vol.astype(np.float32)


_BACKGROUND_RGB = np.array([232.0, 182.0, 205.0])  # eosin pink
_NUCLEUS_RGB = np.array([88.0, 58.0, 140.0])  # haematoxylin purple


def _tile(rng: np.random.Generator, spec: InputSpec, prof: SiteProfile, f: float) -> np.ndarray:
    t = spec.tile
    scale = t / 224.0
    shift = np.asarray(prof.stain_shift)
    img = np.empty((t, t, 3))
    img[:] = _BACKGROUND_RGB + shift * 0.5
    n_nuclei = rng.poisson(25.0 * np.exp(0.45 * f) * scale**2)
    base_r = 5.0 * scale * (1.0 + 0.12 * f)
    nucleus = _NUCLEUS_RGB + shift
    for _ in range(n_nuclei):
        r = max(1.0, base_r * rng.uniform(0.7, 1.3))
        cy, cx = rng.uniform(0, t, 2)
        y0, y1 = int(max(0, cy - r - 1)), int(min(t, cy + r + 2))
        x0, x1 = int(max(0, cx - r - 1)), int(min(t, cx + r + 2))
        yy, xx = np.ogrid[y0:y1, x0:x1]
        alpha = np.clip(r - np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2), 0.0, 1.0)[..., None]
        img[y0:y1, x0:x1] = (1 - alpha) * img[y0:y1, x0:x1] + alpha * nucleus
    img += rng.normal(0.0, 6.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _expression(rng: np.random.Generator, genes: _GeneTable, prof: SiteProfile, site: int, seed: int, f: float) -> np.ndarray:
    batch = np.random.default_rng([seed, 4, site]).normal(0.0, prof.batch_sd, genes.base.shape)
    log_expr = genes.base + batch + rng.normal(0.0, 0.5, genes.base.shape)
    log_expr[genes.module] += 0.6 * f
    return np.expm1(np.clip(log_expr, 0.0, None)).astype(np.float32)
