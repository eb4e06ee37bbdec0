"""DP-SGD on the numpy head (DESIGN §5): Poisson sampling, per-example clipping to norm C, Gaussian
noise sigma * C on the clipped sum, divided by the expected batch size q * n; Adam or plain SGD on
the result (post-processing: it costs no privacy). Pure functions plus one loop; every random draw comes from
the generator it is given."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .head import Params, per_example_grads

MICROBATCH = 64  # per-example gradients are materialised this many at a time: memory O(64 x params)


def poisson_sample(rng: np.random.Generator, n: int, q: float) -> np.ndarray:
    """Each of ``n`` examples independently with probability ``q`` (the sampling the accountant assumes)."""
    return np.flatnonzero(rng.random(n) < q)


def per_example_norms(grads: Params, names: list[str]) -> np.ndarray:
    b = next(iter(grads.values())).shape[0]
    sq = np.zeros(b)
    for name in names:
        sq += np.square(grads[name].reshape(b, -1)).sum(axis=1)
    return np.sqrt(sq)


def clip_factors(norms: np.ndarray, clip: float) -> np.ndarray:
    """min(1, C / ||g_b||): scaled gradients have norm at most C."""
    return np.minimum(1.0, clip / np.maximum(norms, 1e-12))


def clipped_sum(grads: Params, names: list[str], clip: float | None) -> tuple[Params, np.ndarray]:
    """Sum over the batch of per-example gradients, each clipped to ``clip`` (None: unclipped)."""
    norms = per_example_norms(grads, names)
    factors = clip_factors(norms, clip) if clip is not None else np.ones_like(norms)
    return {n: np.tensordot(factors, grads[n], axes=(0, 0)) for n in names}, norms


def add_noise(total: Params, rng: np.random.Generator, sigma: float, clip: float) -> Params:
    """Gaussian noise of standard deviation sigma * C on every coordinate of the clipped sum."""
    if sigma <= 0:
        return total
    return {n: g + rng.normal(0.0, sigma * clip, g.shape) for n, g in total.items()}


@dataclass(frozen=True)
class TrainSpec:
    steps: int
    sampling_rate: float  # q
    noise_multiplier: float  # sigma; 0 with clip None: ordinary (non-private) minibatch training
    clip: float | None
    lr: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    trainable: tuple[str, ...] = ()  # parameter names; empty = all
    optimizer: str = "adam"  # "adam", or "sgd": linear in the noise, so averaging clinics' deltas averages their noise


OPTIMIZERS = ("adam", "sgd")


class SGD:
    def __init__(self, lr: float) -> None:
        self.lr = lr

    def step(self, params: Params, grads: Params) -> None:
        for n, g in grads.items():
            params[n] = params[n] - self.lr * g


class Adam:
    def __init__(self, params: Params, names: list[str], lr: float, betas: tuple[float, float]) -> None:
        self.lr, (self.b1, self.b2), self.t = lr, betas, 0
        self.m = {n: np.zeros_like(params[n], dtype=np.float64) for n in names}
        self.v = {n: np.zeros_like(params[n], dtype=np.float64) for n in names}

    def step(self, params: Params, grads: Params) -> None:
        self.t += 1
        for n, g in grads.items():
            self.m[n] = self.b1 * self.m[n] + (1 - self.b1) * g
            self.v[n] = self.b2 * self.v[n] + (1 - self.b2) * g * g
            mhat = self.m[n] / (1 - self.b1 ** self.t)
            vhat = self.v[n] / (1 - self.b2 ** self.t)
            params[n] = params[n] - self.lr * mhat / (np.sqrt(vhat) + 1e-8)


ReadBatch = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]  # indices -> emb, mask, labels


def train(params: Params, n: int, read: ReadBatch, spec: TrainSpec, rng: np.random.Generator,
          on_step: Callable[[int, dict], None] | None = None) -> Params:
    """``spec.steps`` DP-SGD steps over ``n`` examples (read through ``read``); returns new parameters
    (float64 while training), ``params`` is left untouched."""
    params = {k: np.asarray(v, dtype=np.float64).copy() for k, v in params.items()}
    names = list(spec.trainable) or sorted(params)
    opt = Adam(params, names, spec.lr, spec.betas) if spec.optimizer == "adam" else SGD(spec.lr)
    expected = spec.sampling_rate * n
    for step in range(spec.steps):
        batch = poisson_sample(rng, n, spec.sampling_rate)
        total = {k: np.zeros_like(params[k]) for k in names}
        clipped = 0
        for start in range(0, len(batch), MICROBATCH):
            emb, mask, labels = read(batch[start:start + MICROBATCH])
            _, grads = per_example_grads(params, emb.astype(np.float64), mask.astype(np.float64), labels, names)
            part, norms = clipped_sum(grads, names, spec.clip)
            clipped += int((norms > spec.clip).sum()) if spec.clip is not None else 0
            for k in names:
                total[k] += part[k]
        noisy = add_noise(total, rng, spec.noise_multiplier, spec.clip or 0.0)
        denom = expected if spec.noise_multiplier > 0 else max(len(batch), 1)
        opt.step(params, {k: g / denom for k, g in noisy.items()})
        if on_step is not None:
            on_step(step, {"batch": len(batch), "clipped": clipped})
    return params
