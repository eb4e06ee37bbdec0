"""Privacy accounting with dp-accounting's RDP accountant (DESIGN §5), and planning of a round.

A round of DP-SGD is ``steps`` Poisson-sampled Gaussian mechanisms (sampling rate q, noise
multiplier sigma), self-composed; the round's released metadata (counts and the starting head's
validation loss) is one more Gaussian mechanism. Rounds compose; the clinic's epsilon is that of the
composition of every round it ever ran, at its fixed delta.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass

import dp_accounting
from absl import logging as absl_logging
from dp_accounting import rdp

# dp-accounting logs a warning per RDP order it drops; the CLI's stderr is for one-line errors.
absl_logging.set_verbosity(absl_logging.ERROR)

SIGMA_MIN, SIGMA_MAX = 0.5, 50.0  # beyond SIGMA_MAX a round learns nothing worth its budget
META_SHARE = 0.25  # the metadata release alone may cost at most this share of a round's budget


@dataclass(frozen=True)
class RoundEvents:
    """What one round releases, in accountant terms."""

    sampling_rate: float  # q, Poisson
    noise_multiplier: float  # sigma of DP-SGD (noise std = sigma * clip norm)
    steps: int
    meta_noise_multiplier: float  # Gaussian mechanism on the metadata (0 = none released)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RoundEvents":
        ev = cls(float(d["sampling_rate"]), float(d["noise_multiplier"]), int(d["steps"]), float(d["meta_noise_multiplier"]))
        if not (0 < ev.sampling_rate <= 1 and ev.noise_multiplier > 0 and ev.steps >= 0 and ev.meta_noise_multiplier >= 0):
            raise ValueError(f"round events out of range: {d}")
        return ev

    def dp_event(self) -> dp_accounting.DpEvent:
        sgd = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(self.sampling_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)), self.steps
        )
        if self.meta_noise_multiplier <= 0:
            return sgd
        return dp_accounting.ComposedDpEvent([sgd, dp_accounting.GaussianDpEvent(self.meta_noise_multiplier)])


def epsilon(rounds: list[RoundEvents], delta: float) -> float:
    """Epsilon at ``delta`` of all ``rounds`` composed (RDP accountant, add-or-remove-one neighbours)."""
    if not rounds:
        return 0.0
    acc = rdp.RdpAccountant()
    # identical rounds (a federation's plan repeats one) self-composed: their RDP is computed once
    counts = Counter(rounds)
    acc.compose(dp_accounting.ComposedDpEvent([dp_accounting.SelfComposedDpEvent(r.dp_event(), k) for r, k in counts.items()]))
    return float(acc.get_epsilon(delta))


@dataclass(frozen=True)
class Plan:
    events: RoundEvents
    epsilon_before: float
    epsilon_after: float  # of every round so far plus this one


class BudgetExhausted(Exception):
    """No round fits what is left of the budget."""


def meta_noise_for(z_min: float, eps_max: float, delta: float) -> float:
    """The metadata's noise multiplier: at least ``z_min``, more when that alone would cost over ``eps_max``."""
    if z_min <= 0:
        return 0.0
    cost = lambda z: epsilon([RoundEvents(1.0, 1.0, 0, z)], delta)  # noqa: E731  (no SGD step: the Gaussian alone)
    if cost(z_min) <= eps_max:
        return z_min
    lo, hi = z_min, z_min
    while cost(hi) > eps_max and hi < 1e6:
        lo, hi = hi, hi * 2
    for _ in range(30):
        if hi / lo < 1.01:
            break
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if cost(mid) <= eps_max else (mid, hi)
    return hi


def plan_round(
    past: list[RoundEvents], n_train: int, batch_size: int, epochs: float, meta_noise_multiplier: float,
    epsilon_total: float, delta: float, round_epsilon: float | None = None, rounds_left: int = 1,
) -> Plan:
    """The smallest sigma (best utility) so that every past round plus ``rounds_left`` rounds like this
    one stay within ``epsilon_total`` (the federation's plan splits the lifetime budget evenly over its
    rounds: each clinic spends alike, and the last planned round ends exactly at the budget); with
    ``round_epsilon`` this round alone adds at most that. The planned steps are halved while even
    SIGMA_MAX does not fit. BudgetExhausted when nothing fits."""
    if rounds_left < 1:
        raise ValueError(f"rounds_left must be >= 1, got {rounds_left}")
    if round_epsilon is not None and rounds_left > 1:
        # a cap limits a round, never raises it: the plan's own share when that is below the cap
        shared = plan_round(past, n_train, batch_size, epochs, meta_noise_multiplier, epsilon_total, delta, None, rounds_left)
        if shared.epsilon_after - shared.epsilon_before <= round_epsilon:
            return shared
    if past and round_epsilon is None:
        # The plan's own rounds, made afresh for the whole participation: when every past round was
        # one of them (a clinic whose cases did not change), this round is too, and the last planned
        # round ends at the budget exactly; otherwise the rounds left share what is left.
        whole = _plan([], n_train, batch_size, epochs, meta_noise_multiplier, epsilon_total, delta, None, len(past) + rounds_left)
        if all(e == whole.events for e in past):
            return Plan(whole.events, epsilon(past, delta), epsilon([*past, whole.events], delta))
    return _plan(past, n_train, batch_size, epochs, meta_noise_multiplier, epsilon_total, delta, round_epsilon, rounds_left)


def _plan(past: list[RoundEvents], n_train: int, batch_size: int, epochs: float, meta_noise_multiplier: float,
          epsilon_total: float, delta: float, round_epsilon: float | None, rounds_left: int) -> Plan:
    before = epsilon(past, delta)
    left = epsilon_total - before
    if left <= 1e-3:
        raise BudgetExhausted(f"privacy budget spent: epsilon {before:.4f} of {epsilon_total:g} used (delta {delta:g})")
    per_round = round_epsilon is not None and round_epsilon < left  # the round's cap binds, not the budget
    target = before + round_epsilon if per_round else epsilon_total
    ahead = 1 if per_round else rounds_left  # rounds this plan must leave room for, this one included
    if per_round:
        too_small = (f"the round's epsilon cap ({round_epsilon:g}, --round-epsilon) is too small for a round: one step at the "
                     f"largest noise (sigma {SIGMA_MAX:g}) with the metadata release costs more; raise it "
                     f"(budget left {left:.4f} of {epsilon_total:g}, delta {delta:g})")
    else:
        too_small = (f"privacy budget left ({left:.4f} of {epsilon_total:g}) is too small for a round: "
                     f"epsilon {before:.4f} used (delta {delta:g})")
    if target - before <= 1e-3:
        raise BudgetExhausted(too_small)
    q = min(1.0, batch_size / max(n_train, 1))
    steps = max(1, math.ceil(epochs / q))
    # `ahead` Gaussian releases at z compose exactly to one at z / sqrt(ahead) (Gaussian RDP)
    root = math.sqrt(ahead)
    meta_noise_multiplier = root * meta_noise_for(meta_noise_multiplier / root, META_SHARE * (target - before), delta)

    def eps_with(sigma: float, steps: int) -> float:
        return epsilon([*past, *[RoundEvents(q, sigma, steps, meta_noise_multiplier)] * ahead], delta)

    while eps_with(SIGMA_MAX, steps) > target:
        if steps == 1:
            raise BudgetExhausted(too_small)
        steps = max(1, steps // 2)
    lo, hi = SIGMA_MIN, SIGMA_MAX
    if eps_with(lo, steps) <= target:
        hi = lo
    # Bisection on log sigma: epsilon falls monotonically with sigma.
    for _ in range(24):
        if hi / lo < 1.002:
            break
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps_with(mid, steps) <= target else (mid, hi)
    events = RoundEvents(q, hi, steps, meta_noise_multiplier)
    return Plan(events, before, epsilon([*past, events], delta))
