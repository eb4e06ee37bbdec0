"""Federated aggregation (DESIGN §4): DW-FL and its baselines, the math as pure functions over numpy
arrays, the strategies as small classes around it.

The same code serves the federated teacher simulation and the aggregation server. Each update
arrives as a :class:`ClientUpdate`: its metadata and the L2 norm of its delta known upfront (the
server computes them when the update arrives), and a ``load()`` of the delta itself, called once,
in the one accumulating pass. Memory is O(model), never O(clients x model).

    a_k = n_k / sum_j n_j                          data share (n_k * r_k[m] for modality branch m)
    d_k = softmax(L_k / T)_k                       dynamic share: where theta_t fits worst weighs more
    w_k ∝ ((1 - beta) a_k + beta d_k) * (1 + tau_k)^(-1/2),   sum_k w_k = 1
    theta_{t+1} = theta_t + eta_s * sum_k min(w_k, c) clip(Delta_k, C),   C = min(3 x lower median norm, C_max)

One client's influence is bounded whatever it claims: its weight is capped at ``max_weight`` (c; the
excess goes to the others, and when too few clients take part to reach a total of 1 under the cap the
step is shortened instead), its delta clipped to ``max_clip`` (C_max, fixed by the federation, so no
update can raise the bound by being large; the lower median is one of the clients' own norms, so
with two clients neither raises it alone). One client's own term therefore moves the model by at
most eta_s * c * C_max in L2 (per modality branch as well): where a server-side DP guarantee would
start, with the weights and the bound then fixed independently of any one client. The defaults (c = 1, C_max = 0: none) keep the plain
DW-FL rule for the simulation; the server sets both from its configuration.

A strategy: ``aggregate(global_params, updates, branch_of)``; ``client_config()`` (what a client
must do locally, e.g. FedProx's proximal mu); ``state_dict()`` / ``load_state_dict()`` (server
state that must survive a restart, e.g. FedAvgM's velocity).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import ClassVar

import numpy as np

from edge_runtime import MODALITIES
from edge_runtime.finetune.head import l2_norm  # the norm updates are clipped by: one definition, beside the Params it measures
from edge_runtime.errors import BadInput

Params = dict[str, np.ndarray]
BranchOf = Callable[[str], "str | None"]  # parameter name -> modality branch, None = shared
DYNAMIC_TERMS = ("loss", "relative")


def shared(_name: str) -> None:
    """The default ``branch_of``: every parameter is shared."""
    return None


@dataclass(frozen=True)
class UpdateMeta:
    client: str
    n: int  # training cases
    val_loss: float  # local validation loss of theta_t, measured before training
    modality_fraction: Mapping[str, float] = field(default_factory=dict)  # r_k[m]
    staleness: int = 0  # tau_k = t - base round
    noise_multiplier: float = 0.0  # sigma_k (DP), logged; inverse-variance weighting is optional


@dataclass(frozen=True)
class ClientUpdate:
    """One client's update as aggregation sees it: what the weights and the clip bound need, known
    upfront, and ``load()`` of the delta (theta_k - theta_t), called once per aggregation."""

    meta: UpdateMeta
    norm: float  # L2 norm of the whole delta
    load: Callable[[], Params]

    @classmethod
    def in_memory(cls, meta: UpdateMeta, delta: Params) -> "ClientUpdate":
        return cls(meta, l2_norm(delta), lambda: delta)


@dataclass
class AggregationResult:
    params: Params
    weights: dict[str, dict[str, float]]  # branch ("shared" or modality) -> client -> weight
    accepted: list[str]
    rejected: list[tuple[str, str]]  # (client, reason)
    clip_bound: float
    norms: dict[str, float]


@dataclass(frozen=True)
class ClientConfig:
    """What every client of a strategy does locally (handed to the clients)."""

    proximal_mu: float = 0.0  # FedProx: add (mu/2)||theta - theta_t||^2 to the local loss


# ---------------------------------------------------------------- the math (pure)


def data_shares(n: np.ndarray) -> np.ndarray:
    n = np.asarray(n, dtype=np.float64)
    total = n.sum()
    return n / total if total > 0 else np.zeros_like(n)


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


def branch_cases(metas: Sequence[UpdateMeta], branch: str | None) -> np.ndarray:
    """n_k for the shared parameters, n_k * r_k[m] for modality branch m."""
    return np.array([m.n * (m.modality_fraction.get(branch, 0.0) if branch else 1.0) for m in metas], dtype=np.float64)


def clip_scale(norm: float, bound: float) -> float:
    return 1.0 if bound <= 0 or norm <= bound else bound / norm


def clip_bound(norms: Sequence[float], clip_factor: float, max_clip: float = 0.0) -> float:
    """C = clip_factor x the lower median update norm, at most ``max_clip`` when that is > 0 (0: no
    clipping). The lower median is one of the updates' own norms (with two updates, the smaller: the
    mean of two would let the larger one raise the bound), and the fixed ceiling is what no update moves."""
    ordered = sorted(float(x) for x in norms)
    adaptive = clip_factor * ordered[(len(ordered) - 1) // 2] if ordered and clip_factor > 0 else 0.0
    if max_clip > 0:
        return min(adaptive, max_clip) if adaptive > 0 else max_clip
    return adaptive


def cap_weights(weights: np.ndarray, cap: float) -> np.ndarray:
    """Weights with none above ``cap``: the excess of a capped client is shared by the others in
    proportion to their weights (water-filling). When the clients cannot reach a total of 1 under the
    cap (fewer than 1/cap of them with data), each stays at the cap and the total is below 1: the
    server step is shortened rather than one client trusted with more than ``cap``."""
    w = np.asarray(weights, dtype=np.float64)
    if cap >= 1.0 or w.sum() <= 0:
        return w
    out, fixed = w.copy(), np.zeros(w.shape, dtype=bool)
    for _ in range(w.size):
        over = (out > cap) & ~fixed
        if not over.any():
            break
        fixed |= over
        out[fixed] = cap
        free, left = ~fixed, 1.0 - cap * fixed.sum()
        mass = w[free].sum()
        if mass <= 0 or left <= 0:
            break
        out[free] = w[free] / mass * left
    return np.minimum(out, cap)


def unpublishable(params: Params, max_abs: float) -> str | None:
    """Why an aggregated model must not be published (a parameter not finite or beyond ``max_abs``), or None."""
    for name, arr in params.items():
        a = np.asarray(arr, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            return f"{name}: non-finite values"
        top = float(np.max(np.abs(a))) if a.size else 0.0
        if top > max_abs:
            return f"{name}: |value| up to {top:.3g} exceeds the bound {max_abs:g}"
    return None


def mismatch(delta: Params, reference: Params) -> str | None:
    """Why a delta cannot be added to ``reference``, or None."""
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


def screen(updates: Sequence[ClientUpdate]) -> tuple[list[ClientUpdate], list[tuple[str, str]]]:
    """The updates that may be averaged, on what is known upfront; (client, reason) for the rest."""
    kept, rejected, seen = [], [], set()
    for u in updates:
        m = u.meta
        reason = None
        if m.n <= 0:
            reason = "no training cases (n <= 0)"
        elif not np.isfinite(m.val_loss):
            reason = "validation loss is not finite"
        elif not np.isfinite(u.norm):
            reason = "non-finite values (update norm)"
        elif m.client in seen:
            reason = "second update from the same client in one round"
        if reason:
            rejected.append((m.client, reason))
        else:
            seen.add(m.client)
            kept.append(u)
    return kept, rejected


class _Unusable(Exception):
    def __init__(self, client: str, reason: str) -> None:
        super().__init__(reason)
        self.client, self.reason = client, reason


def weighted_sum(
    reference: Params, updates: Sequence[ClientUpdate], weights: Mapping[str | None, np.ndarray], bound: float,
    branch_of: BranchOf,
) -> Params:
    """sum_k w_k[branch] clip(Delta_k, C), one delta loaded at a time (float64 accumulators).
    Raises _Unusable naming the first update that cannot be loaded or does not fit ``reference``."""
    total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in reference.items()}
    for i, u in enumerate(updates):
        try:
            delta = u.load()
        except Exception as exc:  # noqa: BLE001 - whatever a stored update fails with, it is rejected, not retried
            raise _Unusable(u.meta.client, f"cannot be opened: {exc}") from exc
        reason = mismatch(delta, reference)
        if reason:
            raise _Unusable(u.meta.client, reason)
        scale = clip_scale(u.norm, bound)
        for name, arr in delta.items():
            branch = branch_of(name)
            total[name] += weights[branch if branch in weights else None][i] * scale * arr
        del delta
    return total


# ---------------------------------------------------------------- strategies


def _check_range(name: str, value: float, low: float, high: float = math.inf, *, open_low: bool = False,
                 open_high: bool = False) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok_low = number and (value > low if open_low else value >= low)  # a string never reaches a comparison
    ok_high = number and (value < high if open_high else value <= high)
    if not (ok_low and ok_high):
        lo, hi = "(" if open_low else "[", ")" if open_high or high == math.inf else "]"
        raise BadInput(f"{name} = {value!r} is out of range {lo}{low}, {high}{hi}")


@dataclass(kw_only=True)
class Strategy:
    """Shared by every strategy: clipping, staleness discount, the optional inverse-variance
    weighting, the server learning rate; subclasses choose the client weights and the server step."""

    name: ClassVar[str] = ""
    server_lr: float = 1.0
    clip_factor: float = 3.0  # C = clip_factor x median update norm; 0 disables clipping (unless max_clip)
    max_clip: float = 0.0  # fixed ceiling on C, which no update can move (0: none)
    max_weight: float = 1.0  # cap on each client's weight per branch (1: none); see cap_weights
    inverse_variance: bool = False

    def __post_init__(self) -> None:
        _check_range("server_lr", self.server_lr, 0.0, open_low=True)
        _check_range("clip_factor", self.clip_factor, 0.0)
        _check_range("max_clip", self.max_clip, 0.0)
        _check_range("max_weight", self.max_weight, 0.0, 1.0, open_low=True)

    # -- what subclasses change
    def client_weights(self, metas: Sequence[UpdateMeta], branch: str | None) -> np.ndarray:
        return self._weights(metas, branch, beta=0.0)

    def client_config(self) -> ClientConfig:
        return ClientConfig()

    def state_dict(self) -> Params:
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if state:
            raise BadInput(f"strategy {self.name!r} keeps no server state (got {sorted(state)[:3]})")

    def step(self, global_params: Params, mean_delta: Params) -> Params:
        """The server step: theta + eta_s * mean delta."""
        return {k: (v + self.server_lr * mean_delta[k]).astype(v.dtype) for k, v in global_params.items()}

    # -- shared
    def _weights(self, metas: Sequence[UpdateMeta], branch: str | None, *, beta: float, temperature: float = 1.0,
                 dynamic: str = "loss") -> np.ndarray:
        noise = np.array([m.noise_multiplier for m in metas]) if self.inverse_variance else None
        return dwfl_weights(branch_cases(metas, branch), np.array([m.val_loss for m in metas]),
                            np.array([m.staleness for m in metas]), beta, temperature, noise, dynamic)

    def mean_update(self, global_params: Params, updates: Sequence[ClientUpdate],
                    branch_of: BranchOf = shared) -> tuple[Params, AggregationResult]:
        """The weighted, clipped mean delta and its bookkeeping. Weights and the clip bound come from
        what is known upfront; each delta is loaded once. An update that cannot be loaded (or does
        not fit the model) is rejected with its reason and the sum is made again without it: the
        weights of the others depend on who takes part."""
        kept, rejected = screen(updates)
        while True:
            metas = [u.meta for u in kept]
            bound = clip_bound([u.norm for u in kept], self.clip_factor, self.max_clip)
            weights = {b: cap_weights(self.client_weights(metas, b), self.max_weight) for b in (None, *MODALITIES)} if kept else {}
            try:
                total = weighted_sum(global_params, kept, weights, bound, branch_of) if kept else \
                    {k: np.zeros(v.shape, dtype=np.float64) for k, v in global_params.items()}
                break
            except _Unusable as bad:
                rejected.append((bad.client, bad.reason))
                kept = [u for u in kept if u.meta.client != bad.client]
        result = AggregationResult(
            params={},
            weights={(b or "shared"): {m.client: round(float(w[i]), 6) for i, m in enumerate(metas)} for b, w in weights.items()},
            accepted=[m.client for m in metas],
            rejected=rejected,
            clip_bound=bound,
            norms={u.meta.client: u.norm for u in kept},
        )
        return total, result

    def aggregate(self, global_params: Params, updates: Sequence[ClientUpdate], branch_of: BranchOf = shared) -> AggregationResult:
        delta, result = self.mean_update(global_params, updates, branch_of)
        result.params = self.step(global_params, delta)
        return result


@dataclass(kw_only=True)
class DWFL(Strategy):
    """Dynamic-weight aggregation (DESIGN §4)."""

    name: ClassVar[str] = "dwfl"
    beta: float = 0.3
    temperature: float = 1.0
    dynamic: str = "loss"  # see dynamic_shares

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range("beta", self.beta, 0.0, 1.0)
        _check_range("temperature", self.temperature, 0.0, open_low=True)
        if self.dynamic not in DYNAMIC_TERMS:
            raise BadInput(f"dynamic = {self.dynamic!r}: choose one of {', '.join(DYNAMIC_TERMS)}")

    def client_weights(self, metas: Sequence[UpdateMeta], branch: str | None) -> np.ndarray:
        return self._weights(metas, branch, beta=self.beta, temperature=self.temperature, dynamic=self.dynamic)


@dataclass(kw_only=True)
class FedAvg(Strategy):
    """FedAvg (McMahan et al.): weights by data share only, with the same clipping, staleness
    discount and validation as DW-FL."""

    name: ClassVar[str] = "fedavg"


@dataclass(kw_only=True)
class FedProx(FedAvg):
    """FedProx (Li et al.): FedAvg on the server; clients add (mu/2)||theta - theta_t||^2 locally."""

    name: ClassVar[str] = "fedprox"
    mu: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range("mu", self.mu, 0.0)

    def client_config(self) -> ClientConfig:
        return ClientConfig(proximal_mu=self.mu)


@dataclass(kw_only=True)
class FedAvgM(FedAvg):
    """FedAvgM (Hsu et al.): FedAvg with server momentum, v <- m v + Delta, theta <- theta + eta v."""

    name: ClassVar[str] = "fedavgm"
    momentum: float = 0.9
    velocity: Params | None = field(default=None, init=False, repr=False)  # state, not a setting

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range("momentum", self.momentum, 0.0, 1.0, open_high=True)

    def step(self, global_params: Params, mean_delta: Params) -> Params:
        if self.velocity is None:
            self.velocity = {k: np.zeros_like(v, dtype=np.float64) for k, v in global_params.items()}
        for k in global_params:
            self.velocity[k] = momentum_step(self.velocity[k], mean_delta[k], self.momentum)
        return {k: (v + self.server_lr * self.velocity[k]).astype(v.dtype) for k, v in global_params.items()}

    def state_dict(self) -> Params:
        return {f"velocity/{k}": v for k, v in (self.velocity or {}).items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        unknown = [k for k in state if not k.startswith("velocity/")]
        if unknown:
            raise BadInput(f"strategy 'fedavgm': unknown state entries {unknown[:3]}")
        self.velocity = {k[len("velocity/"):]: np.asarray(v, dtype=np.float64) for k, v in state.items()} or None


def momentum_step(velocity: np.ndarray, delta: np.ndarray, momentum: float) -> np.ndarray:
    return momentum * velocity + delta


# ---------------------------------------------------------------- dynamic weights with memory (issue 15)
#
# The dynamic share d_k of DESIGN §4 (softmax(L_k / T)) reacts to absolute loss gaps, which shrink as
# training proceeds, and forgets every round. The rules below are scale-free (they see L_k / mean L
# only) and keep a per-client state across rounds; β stays the weight of the dynamic share:
#
#     w_k ∝ ((1 - β) a_k + β d_k) (1 + τ_k)^(-1/2),   d_k ∈ [c/K, C/K],   Σ_k d_k = 1
#
# Influence bound: d_k ≤ C/K, so with fresh updates w_k ≤ (1 - β) a_k + β C/K (≤ (1 + β(C - 1))/K at
# equal data shares), and one client moves θ by at most η_s w_k C_Δ, C_Δ the clip bound. That product
# is the L2 sensitivity a server-side Gaussian mechanism must be calibrated to (noise sd σ η_s w_max
# C_Δ); it holds as a DP sensitivity only with a fixed C_Δ: the default C_Δ = 3 x median norm depends
# on the other clients' updates. For a modality branch d is renormalised over the clients that have
# the modality, so there the bound is C/K divided by their share of d (at least c/K each).

def relative_losses(losses: np.ndarray) -> np.ndarray:
    """L_k / mean_j L_j: unchanged when every loss is multiplied by the same factor (all ones when the
    mean is not positive)."""
    losses = np.asarray(losses, dtype=np.float64)
    top = losses.max() if losses.size else 0.0
    if not top > 0:
        return np.ones_like(losses)
    scaled = losses / top  # first: a mean of claimed losses near the float maximum would overflow
    return scaled / scaled.mean()


def capped_simplex(v: np.ndarray, low: float, high: float) -> np.ndarray:
    """The KL (multiplicative) projection of positive ``v`` onto {w : Σ w = 1, low ≤ w ≤ high}:
    w_k = clip(t v_k, low, high) with the one scale t that makes Σ w = 1 (bisection on log t; needs
    K low ≤ 1 ≤ K high). Order-preserving: a larger v_k never gets a smaller w_k."""
    v = np.asarray(v, dtype=np.float64)
    k = v.size
    if k == 0:
        return v
    if not (k * low <= 1.0 + 1e-12 and k * high >= 1.0 - 1e-12 and low <= high):
        raise ValueError(f"caps [{low}, {high}] cannot hold {k} weights summing to 1")
    v = np.maximum(v, 0.0)
    if v.sum() <= 0:
        return np.full(k, 1.0 / k)
    v = np.maximum(v / v.sum(), 1e-12)  # a zero entry still gets its share of what the caps leave
    lo_t, hi_t = math.log(low / v.max()) if low > 0 else -800.0, math.log(high / v.min()) + 1.0
    for _ in range(200):  # Σ clip(t v, low, high) is non-decreasing in t
        mid = 0.5 * (lo_t + hi_t)
        if np.clip(math.exp(mid) * v, low, high).sum() < 1.0:
            lo_t = mid
        else:
            hi_t = mid
    w = np.clip(math.exp(hi_t) * v, low, high)
    return w / w.sum()


def mw_shares(prior: np.ndarray, losses: np.ndarray, *, eta: float, smoothing: float, floor: float,
              cap: float) -> np.ndarray:
    """One multiplicative-weights step (agnostic FL / group DRO) of the dynamic share:
    λ_k ∝ λ_k exp(η (L_k - mean L) / mean L), mixed with uniform ((1 - s) λ + s/K: forgets, so a
    client that recovers comes back down) and projected to [c/K, C/K] (``floor`` c, ``cap`` C)."""
    prior = np.asarray(prior, dtype=np.float64)
    k = prior.size
    if k == 0:
        return prior
    g = relative_losses(losses) - 1.0
    # in log space: one client's enormous claimed loss saturates at the cap, it never overflows to NaN
    log_x = np.log(np.maximum(prior / prior.sum(), 1e-300)) + eta * g
    x = np.exp(log_x - log_x.max())
    x = (1.0 - smoothing) * x / x.sum() + smoothing / k
    return capped_simplex(x, floor / k, cap / k)


def power_shares(relative: np.ndarray, *, q: float, floor: float, cap: float) -> np.ndarray:
    """q-FFL-style dynamic share from relative losses r_k = L_k / mean L: d_k ∝ r_k^q, projected to
    [c/K, C/K]. q = 0 is uniform."""
    relative = np.asarray(relative, dtype=np.float64)
    k = relative.size
    if k == 0:
        return relative
    log_x = q * np.log(np.maximum(relative, 1e-12))  # r^q in log space: no overflow for any claimed loss
    return capped_simplex(np.exp(log_x - log_x.max()), floor / k, cap / k)


def mixed_weights(n: np.ndarray, dynamic: np.ndarray, staleness: np.ndarray, beta: float,
                  noise_multiplier: np.ndarray | None = None) -> np.ndarray:
    """w_k ∝ ((1 - β) a_k + β d_k) (1 + τ_k)^(-1/2) for a given dynamic share d (DESIGN §4's mixing);
    a client without data for the branch never weighs (d renormalised over the others); all zero
    when no client has data."""
    a = data_shares(n)
    if a.sum() == 0:
        return a
    d = np.asarray(dynamic, dtype=np.float64) * (np.asarray(n) > 0)
    d = d / d.sum() if d.sum() > 0 else a
    w = ((1 - beta) * a + beta * d) * staleness_discount(staleness)
    if noise_multiplier is not None:
        w = w / (1.0 + np.asarray(noise_multiplier, dtype=np.float64) ** 2)
    return w / w.sum()


def _prior(state: Mapping[str, float], clients: Sequence[str], unseen: float | None = None) -> np.ndarray:
    """The clients' stored values; a client never seen before gets ``unseen`` (default: the mean of
    the known ones present, 1 when none is known), so it starts at the uniform share."""
    known = [state[c] for c in clients if c in state]
    fill = unseen if unseen is not None else (float(np.mean(known)) if known else 1.0)
    return np.array([state.get(c, fill) for c in clients], dtype=np.float64)


def _check_caps(floor: float, cap: float) -> None:
    _check_range("floor", floor, 0.0, 1.0)
    _check_range("cap", cap, 1.0)


def _state_entries(state: Mapping[str, np.ndarray], prefix: str, strategy: str) -> dict[str, float]:
    unknown = [k for k in state if not k.startswith(prefix)]
    if unknown:
        raise BadInput(f"strategy {strategy!r}: unknown state entries {unknown[:3]}")
    out = {}
    for k, v in state.items():
        value = float(np.asarray(v).reshape(-1)[0]) if np.asarray(v).size == 1 else math.nan
        if not (math.isfinite(value) and value > 0):
            raise BadInput(f"strategy {strategy!r}: state entry {k} must be one positive finite number")
        out[k[len(prefix):]] = value
    return out


def accepted_metas(updates: Sequence[ClientUpdate], accepted: Sequence[str]) -> list[UpdateMeta]:
    """The metadata of the accepted updates, in ``accepted`` order (a client's first update: the one
    ``screen`` keeps)."""
    first: dict[str, UpdateMeta] = {}
    for u in updates:
        first.setdefault(u.meta.client, u.meta)
    return [first[c] for c in accepted]


@dataclass(kw_only=True)
class _DynamicWithMemory(Strategy):
    """Shared by ``dwfl_mw`` and ``dwfl_pow``: DESIGN §4's mixing with a dynamic share computed from a
    per-client state; the state is read (never changed) while weighing and committed once per
    aggregation, over the accepted clients."""

    beta: float = 0.3
    floor: float = 0.25  # c: d_k ≥ c/K
    cap: float = 3.0  # C: d_k ≤ C/K

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range("beta", self.beta, 0.0, 1.0)
        _check_caps(self.floor, self.cap)

    def dynamic_shares(self, metas: Sequence[UpdateMeta]) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _commit(self, metas: Sequence[UpdateMeta]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def client_weights(self, metas: Sequence[UpdateMeta], branch: str | None) -> np.ndarray:
        noise = np.array([m.noise_multiplier for m in metas]) if self.inverse_variance else None
        return mixed_weights(branch_cases(metas, branch), self.dynamic_shares(metas),
                             np.array([m.staleness for m in metas]), self.beta, noise)

    def aggregate(self, global_params: Params, updates: Sequence[ClientUpdate], branch_of: BranchOf = shared) -> AggregationResult:
        result = super().aggregate(global_params, updates, branch_of)
        metas = accepted_metas(updates, result.accepted)
        if metas:
            self._commit(metas)
        return result


@dataclass(kw_only=True)
class DWFLMemory(_DynamicWithMemory):
    """DW-FL whose dynamic share is a multiplicative-weights state across rounds (``dwfl_mw``):

        r_k = L_k / mean_j L_j                                        scale-free
        λ_k ← Π_[c/K, C/K]((1 - s) λ_k e^(η (r_k - 1)) / Z + s/K),    d_k = λ_k this round
        w_k ∝ ((1 - β) a_k + β λ_k) (1 + τ_k)^(-1/2)

    A client that stays worst keeps gaining, up to C/K; λ is kept per client name in ``state_dict()``
    (a restarted server goes on where it stopped; absent clients keep theirs; a client never seen
    starts at the uniform share). Bound on one client's influence (see the comment above
    ``relative_losses``): w_k ≤ (1 - β) a_k + β C/K with fresh updates, its move ≤ η_s w_k C_Δ."""

    name: ClassVar[str] = "dwfl_mw"
    eta: float = 1.0  # step on the relative loss gap (r_k - 1); chosen on the paired benchmark's tuning seeds
    smoothing: float = 0.1  # s: mix with uniform every round
    lam: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range("eta", self.eta, 0.0)
        _check_range("smoothing", self.smoothing, 0.0, 1.0)

    def dynamic_shares(self, metas: Sequence[UpdateMeta]) -> np.ndarray:
        """This round's d_k for these clients, from the stored λ (pure: the state is not changed)."""
        return mw_shares(_prior(self.lam, [m.client for m in metas]), np.array([m.val_loss for m in metas]),
                         eta=self.eta, smoothing=self.smoothing, floor=self.floor, cap=self.cap)

    def _commit(self, metas: Sequence[UpdateMeta]) -> None:
        clients = [m.client for m in metas]
        new = self.dynamic_shares(metas) * _prior(self.lam, clients).sum()  # keeps the present clients' total mass
        self.lam.update({c: float(max(v, 1e-12)) for c, v in zip(clients, new)})

    def state_dict(self) -> Params:
        return {f"lambda/{c}": np.array(v) for c, v in self.lam.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.lam = _state_entries(state, "lambda/", self.name)


@dataclass(kw_only=True)
class DWFLPower(_DynamicWithMemory):
    """DW-FL with a q-FFL-style relative-loss power as the dynamic share (``dwfl_pow``):

        r̄_k ← m r̄_k + (1 - m) L_k / mean_j L_j    memory: running mean of the relative loss (1 unseen)
        d_k = Π_[c/K, C/K](r̄_k^q / Σ_j r̄_j^q),      w_k ∝ ((1 - β) a_k + β d_k) (1 + τ_k)^(-1/2)

    Scale-free; r̄ per client is in ``state_dict()``; the same influence bound as ``dwfl_mw``."""

    name: ClassVar[str] = "dwfl_pow"
    q: float = 3.0
    memory: float = 0.5  # m; 0 = no memory
    ratio: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range("q", self.q, 0.0)
        _check_range("memory", self.memory, 0.0, 1.0, open_high=True)

    def _smoothed(self, metas: Sequence[UpdateMeta]) -> np.ndarray:
        prior = _prior(self.ratio, [m.client for m in metas], unseen=1.0)
        return self.memory * prior + (1.0 - self.memory) * relative_losses(np.array([m.val_loss for m in metas]))

    def dynamic_shares(self, metas: Sequence[UpdateMeta]) -> np.ndarray:
        return power_shares(self._smoothed(metas), q=self.q, floor=self.floor, cap=self.cap)

    def _commit(self, metas: Sequence[UpdateMeta]) -> None:
        self.ratio.update({m.client: float(max(v, 1e-12)) for m, v in zip(metas, self._smoothed(metas))})

    def state_dict(self) -> Params:
        return {f"ratio/{c}": np.array(v) for c, v in self.ratio.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.ratio = _state_entries(state, "ratio/", self.name)


# ---------------------------------------------------------------- server optimizers, q-FedAvg


def adaptive_step(m: np.ndarray, v: np.ndarray, delta: np.ndarray, *, beta1: float, beta2: float,
                  rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Server moments of Reddi et al. (2021), Algorithm 2, on the averaged delta Δ:
    m ← β1 m + (1 - β1) Δ;  Adam: v ← β2 v + (1 - β2) Δ²;  Yogi: v ← v - (1 - β2) Δ² sign(v - Δ²)."""
    m = beta1 * m + (1 - beta1) * delta
    d2 = delta * delta
    if rule == "adam":
        v = beta2 * v + (1 - beta2) * d2
    elif rule == "yogi":
        v = v - (1 - beta2) * d2 * np.sign(v - d2)
    else:
        raise ValueError(f"unknown adaptive rule {rule!r}")
    return m, v


@dataclass(kw_only=True)
class FedAdam(FedAvg):
    """FedAdam (Reddi et al. 2021): FedAvg's weighted, clipped mean delta Δ feeds server moments,
    θ ← θ + η_s m / (√v + τ); v starts at τ² (the paper's v_-1 ≥ τ²), no bias correction (as in the
    paper). m and v are in ``state_dict()``."""

    name: ClassVar[str] = "fedadam"
    rule: ClassVar[str] = "adam"
    server_lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    moments: dict[str, tuple[np.ndarray, np.ndarray]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range("beta1", self.beta1, 0.0, 1.0, open_high=True)
        _check_range("beta2", self.beta2, 0.0, 1.0, open_high=True)
        _check_range("tau", self.tau, 0.0, open_low=True)

    def step(self, global_params: Params, mean_delta: Params) -> Params:
        if self.moments is None:
            self.moments = {k: (np.zeros(v.shape), np.full(v.shape, self.tau ** 2)) for k, v in global_params.items()}
        out = {}
        for k, theta in global_params.items():
            m, v = adaptive_step(*self.moments[k], np.asarray(mean_delta[k], dtype=np.float64), beta1=self.beta1,
                                 beta2=self.beta2, rule=self.rule)
            self.moments[k] = (m, v)
            out[k] = (theta + self.server_lr * m / (np.sqrt(np.maximum(v, 0.0)) + self.tau)).astype(theta.dtype)
        return out

    def state_dict(self) -> Params:
        state: Params = {}
        for k, (m, v) in (self.moments or {}).items():
            state[f"m/{k}"], state[f"v/{k}"] = m, v
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        unknown = [k for k in state if not k.startswith(("m/", "v/"))]
        names = {k[2:] for k in state if k not in unknown}
        incomplete = [n for n in names if f"m/{n}" not in state or f"v/{n}" not in state]
        if unknown or incomplete:
            raise BadInput(f"strategy {self.name!r}: unknown or incomplete state entries {(unknown + incomplete)[:3]}")
        self.moments = {n: (np.asarray(state[f"m/{n}"], dtype=np.float64), np.asarray(state[f"v/{n}"], dtype=np.float64))
                        for n in names} or None


@dataclass(kw_only=True)
class FedYogi(FedAdam):
    """FedYogi (Reddi et al. 2021): FedAdam with Yogi's additive second moment."""

    name: ClassVar[str] = "fedyogi"
    rule: ClassVar[str] = "yogi"


def qffl_weights(n: np.ndarray, losses: np.ndarray, q: float) -> np.ndarray:
    """q-FedAvg's direction weights p_k F_k^q / Σ_j p_j F_j^q (p_k the data share), each client its
    own loss F_k (Li et al. 2020)."""
    p = data_shares(n)
    f = np.maximum(np.asarray(losses, dtype=np.float64), 1e-12) ** q
    raw = p * f
    return raw / raw.sum() if raw.sum() > 0 else raw


def qffl_step_scale(n: np.ndarray, losses: np.ndarray, sq_norms: np.ndarray, q: float, lipschitz: float) -> float:
    """The h_k normaliser of q-FedAvg (Li et al. 2020, Algorithm 2) as a factor on the weighted mean
    delta. With Δw_k = L (θ_t - θ_k) = -L Δ_k the paper steps θ ← θ - Σ_k p_k F_k^q Δw_k / Σ_k p_k h_k,
    h_k = q F_k^(q-1) ||Δw_k||² + L F_k^q; so θ ← θ + s Σ_k w_k Δ_k with w = ``qffl_weights`` and
    s = Σ p F^q / Σ p (F^q + q L F^(q-1) ||Δ_k||²) ∈ (0, 1]. q = 0 is FedAvg (s = 1)."""
    p = data_shares(n)
    f = np.maximum(np.asarray(losses, dtype=np.float64), 1e-12)
    num = float(np.sum(p * f ** q))
    den = float(np.sum(p * (f ** q + q * lipschitz * f ** (q - 1) * np.asarray(sq_norms, dtype=np.float64))))
    return num / den if den > 0 else 1.0


@dataclass(kw_only=True)
class QFedAvg(FedAvg):
    """q-FedAvg (Li et al. 2020, "Fair resource allocation in federated learning"): each client's
    clipped delta weighs p_k F_k^q (F_k its own validation loss of θ_t, not one shared loss), and the
    step is normalised by Σ p_k h_k (``qffl_step_scale``); L is the Lipschitz estimate (the paper:
    1 / local learning rate). Staleness and inverse variance apply as in FedAvg."""

    name: ClassVar[str] = "qfedavg"
    q: float = 1.0
    lipschitz: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range("q", self.q, 0.0)
        _check_range("lipschitz", self.lipschitz, 0.0, open_low=True)

    def client_weights(self, metas: Sequence[UpdateMeta], branch: str | None) -> np.ndarray:
        base = self._weights(metas, branch, beta=0.0)  # data share x staleness (x inverse variance)
        raw = base * np.maximum(np.array([m.val_loss for m in metas], dtype=np.float64), 1e-12) ** self.q
        return raw / raw.sum() if raw.sum() > 0 else raw

    def aggregate(self, global_params: Params, updates: Sequence[ClientUpdate], branch_of: BranchOf = shared) -> AggregationResult:
        delta, result = self.mean_update(global_params, updates, branch_of)
        metas = accepted_metas(updates, result.accepted)
        clipped = [min(result.norms[m.client], result.clip_bound) if result.clip_bound > 0 else result.norms[m.client]
                   for m in metas]
        scale = qffl_step_scale(np.array([m.n for m in metas], dtype=np.float64), np.array([m.val_loss for m in metas]),
                                np.square(clipped), self.q, self.lipschitz) if metas else 1.0
        result.params = self.step(global_params, {k: scale * v for k, v in delta.items()})
        return result


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (DWFL, FedAvg, FedProx, FedAvgM, DWFLMemory, DWFLPower, FedAdam, FedYogi, QFedAvg)
}
# The product's DW-FL (DESIGN §4): chosen on benchmarks/federation_noniid.py's paired evidence (README).
DEFAULT_STRATEGY = "dwfl_mw"


def settings_of(name: str) -> set[str]:
    """The constructor settings strategy ``name`` takes (BadInput for an unknown name)."""
    if name not in STRATEGIES:
        raise BadInput(f"unknown strategy {name!r}: choose one of {', '.join(STRATEGIES)}")
    return {f.name for f in fields(STRATEGIES[name]) if f.init}


def build_strategy(name: str, options: Mapping[str, object]) -> Strategy:
    """Strategy ``name`` with these constructor settings, every one checked (unknown name, unknown
    setting, out of range: one-line BadInput) before any work starts."""
    unknown = sorted(set(options) - settings_of(name))
    if unknown:
        raise BadInput(f"strategy {name!r} has no setting {', '.join(unknown)} (it takes {', '.join(sorted(settings_of(name)))})")
    try:
        return STRATEGIES[name](**options)
    except TypeError as exc:  # a setting of the wrong kind (e.g. a string where a number goes)
        raise BadInput(f"strategy {name!r}: {exc}") from None


def in_memory(updates: Sequence[tuple[UpdateMeta, Params]]) -> list[ClientUpdate]:
    """Updates already in memory (simulation, tests)."""
    return [ClientUpdate.in_memory(meta, delta) for meta, delta in updates]
