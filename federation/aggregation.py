"""Federated aggregation (DESIGN §4): DW-FL and its baselines as pure functions over numpy arrays.

The same code serves the federated teacher simulation and the aggregation server. Updates arrive
through a re-iterable *source* (a callable returning a fresh iterator, e.g. reading blobs from
disk): a first pass reads only metadata and norms, a second pass accumulates, so memory is
O(model), never O(clients x model).

    a_k = n_k / sum_j n_j                          data share (n_k * r_k[m] for modality branch m)
    d_k = softmax(L_k / T)_k                       dynamic share: where theta_t fits worst weighs more
    w_k ∝ ((1 - beta) a_k + beta d_k) * (1 + tau_k)^(-1/2),   sum_k w_k = 1
    theta_{t+1} = theta_t + eta_s * sum_k w_k clip(Delta_k, C),   C = 3 x median update norm
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

Params = dict[str, np.ndarray]
BranchOf = Callable[[str], "str | None"]  # parameter name -> modality branch, None = shared


@dataclass(frozen=True)
class UpdateMeta:
    client: str
    n: int  # training cases
    val_loss: float  # local validation loss of theta_t, measured before training
    modality_fraction: Mapping[str, float] = field(default_factory=dict)  # r_k[m]
    staleness: int = 0  # tau_k = t - base round
    noise_multiplier: float = 0.0  # sigma_k (DP), logged; inverse-variance weighting is optional


@dataclass
class ClientUpdate:
    meta: UpdateMeta
    delta: Params  # theta_k - theta_t


UpdateSource = Callable[[], Iterable[ClientUpdate]]


# ---------------------------------------------------------------- the weights (pure)


def data_shares(n: np.ndarray) -> np.ndarray:
    n = np.asarray(n, dtype=np.float64)
    total = n.sum()
    return n / total if total > 0 else np.zeros_like(n)


DYNAMIC_TERMS = ("loss", "relative")


def dynamic_shares(losses: np.ndarray, temperature: float = 1.0, dynamic: str = "loss") -> np.ndarray:
    """Softmax of the clients' validation losses of the current global model, L_k / T as DESIGN §4
    writes it ("loss"), or of L_k / (T mean_j L_j) ("relative": the same spread whatever the
    loss's scale, which shrinks as training goes on)."""
    losses = np.asarray(losses, dtype=np.float64)
    if dynamic == "relative":
        mean = losses.mean() if losses.size else 1.0
        losses = losses / mean if mean > 0 else np.zeros_like(losses)
    elif dynamic != "loss":
        raise ValueError(f"unknown dynamic term {dynamic!r}: choose one of {DYNAMIC_TERMS}")
    z = losses / temperature
    z = np.exp(z - z.max())
    return z / z.sum()


def staleness_discount(staleness: np.ndarray) -> np.ndarray:
    return (1.0 + np.asarray(staleness, dtype=np.float64)) ** -0.5


def dwfl_weights(
    n: np.ndarray, losses: np.ndarray, staleness: np.ndarray, beta: float = 0.3, temperature: float = 1.0,
    noise_multiplier: np.ndarray | None = None, dynamic: str = "loss",
) -> np.ndarray:
    """Normalised client weights; all zero when no client has data for this branch."""
    a = data_shares(n)
    if a.sum() == 0:
        return a
    d = dynamic_shares(losses, temperature, dynamic) * (np.asarray(n) > 0)  # a client without data never weighs
    d = d / d.sum()
    w = ((1 - beta) * a + beta * d) * staleness_discount(staleness)
    if noise_multiplier is not None:  # optional: inverse variance of the DP noise
        w = w / (1.0 + np.asarray(noise_multiplier, dtype=np.float64) ** 2)
    return w / w.sum()


def clip_scale(norm: float, bound: float) -> float:
    return 1.0 if bound <= 0 or norm <= bound else bound / norm


# ---------------------------------------------------------------- strategies


@dataclass
class AggregationResult:
    params: Params
    weights: dict[str, dict[str, float]]  # branch ("shared" or modality) -> client -> weight
    accepted: list[str]
    rejected: list[tuple[str, str]]  # (client, reason)
    clip_bound: float
    norms: dict[str, float]


def _check(delta: Params, reference: Params) -> str | None:
    """Why an update cannot be averaged, or None."""
    if set(delta) != set(reference):
        missing, extra = set(reference) - set(delta), set(delta) - set(reference)
        return f"parameter names differ (missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
    for name, ref in reference.items():
        arr = delta[name]
        if not isinstance(arr, np.ndarray) or arr.shape != ref.shape:
            return f"{name}: shape {getattr(arr, 'shape', None)} != {ref.shape}"
        if not np.all(np.isfinite(arr)):
            return f"{name}: non-finite values"
    return None


def _norm(delta: Params) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values())))


@dataclass
class DWFL:
    """Dynamic-weight aggregation. ``beta=0`` is FedAvg (data-share weights) with the same clipping,
    staleness discount and validation."""

    beta: float = 0.3
    temperature: float = 1.0
    server_lr: float = 1.0
    clip_factor: float = 3.0  # C = clip_factor x median update norm; 0 disables clipping
    inverse_variance: bool = False
    dynamic: str = "loss"  # see dynamic_shares
    modalities: tuple[str, ...] = ("ct", "pathology", "genomics")

    def client_weights(self, metas: list[UpdateMeta], branch: str | None) -> np.ndarray:
        n = np.array([m.n * (m.modality_fraction.get(branch, 0.0) if branch else 1.0) for m in metas], dtype=np.float64)
        noise = np.array([m.noise_multiplier for m in metas]) if self.inverse_variance else None
        return dwfl_weights(n, np.array([m.val_loss for m in metas]), np.array([m.staleness for m in metas]),
                            self.beta, self.temperature, noise, self.dynamic)

    def mean_update(self, global_params: Params, source: UpdateSource, branch_of: BranchOf) -> tuple[Params, AggregationResult]:
        """Two streaming passes: (1) validate, measure norms, read metadata; (2) accumulate the
        weighted, clipped deltas. Returns the aggregated delta and the bookkeeping."""
        metas, norms, rejected = [], {}, []
        for update in source():
            reason = _check(update.delta, global_params)
            if reason is None and update.meta.n <= 0:
                reason = "no training cases (n <= 0)"
            if reason is None and not np.isfinite(update.meta.val_loss):
                reason = "validation loss is not finite"
            if reason is None and update.meta.client in norms:
                reason = "second update from the same client in one round"
            if reason:
                rejected.append((update.meta.client, reason))
                continue
            metas.append(update.meta)
            norms[update.meta.client] = _norm(update.delta)
        bound = self.clip_factor * float(np.median(list(norms.values()))) if norms and self.clip_factor > 0 else 0.0
        branches = {None, *self.modalities}
        weights = {b: self.client_weights(metas, b) for b in branches} if metas else {}
        index = {m.client: i for i, m in enumerate(metas)}
        total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in global_params.items()}
        for update in source():
            i = index.get(update.meta.client)
            if i is None or _check(update.delta, global_params) is not None:
                continue
            scale = clip_scale(norms[update.meta.client], bound)
            for name, arr in update.delta.items():
                branch = branch_of(name)
                total[name] += weights[branch if branch in branches else None][i] * scale * arr
            index.pop(update.meta.client)  # a replayed update in the stream is counted once
        result = AggregationResult(
            params={},
            weights={(b or "shared"): {m.client: round(float(w[i]), 6) for i, m in enumerate(metas)} for b, w in weights.items()},
            accepted=[m.client for m in metas],
            rejected=rejected,
            clip_bound=bound,
            norms=norms,
        )
        return total, result

    def aggregate(self, global_params: Params, source: UpdateSource, branch_of: BranchOf = lambda name: None) -> AggregationResult:
        delta, result = self.mean_update(global_params, source, branch_of)
        result.params = {k: (v + self.server_lr * delta[k]).astype(v.dtype) for k, v in global_params.items()}
        return result


def FedAvg(**kwargs) -> DWFL:  # noqa: N802 - a strategy constructor, named like the others
    """FedAvg (McMahan et al.): weights by data share only."""
    return DWFL(beta=0.0, **kwargs)


@dataclass
class FedProx(DWFL):
    """FedProx (Li et al.): server side is FedAvg; clients add (mu/2)||theta - theta_t||^2 locally."""

    beta: float = 0.0
    mu: float = 0.01


@dataclass
class FedAvgM(DWFL):
    """FedAvgM (Hsu et al.): FedAvg with server momentum, v <- m v + Delta, theta <- theta + eta v."""

    beta: float = 0.0
    momentum: float = 0.9
    velocity: Params | None = None

    def aggregate(self, global_params: Params, source: UpdateSource, branch_of: BranchOf = lambda name: None) -> AggregationResult:
        delta, result = self.mean_update(global_params, source, branch_of)
        if self.velocity is None:
            self.velocity = {k: np.zeros_like(v, dtype=np.float64) for k, v in global_params.items()}
        for k in global_params:
            self.velocity[k] = self.momentum * self.velocity[k] + delta[k]
        result.params = {k: (v + self.server_lr * self.velocity[k]).astype(v.dtype) for k, v in global_params.items()}
        return result


STRATEGIES: dict[str, Callable[..., DWFL]] = {"dwfl": DWFL, "fedavg": FedAvg, "fedprox": FedProx, "fedavgm": FedAvgM}


def from_list(updates: list[ClientUpdate]) -> UpdateSource:
    """A source over updates already in memory (simulation, tests)."""
    return lambda: iter(updates)
