"""Clinic federation rounds in one process (``benchmarks/federation_gain.py``): each clinic runs the
clinic's own round code (edge_runtime.finetune.run: the stable validation split, the plan within
its lifetime budget, ``train_round``, ``update_delta``), its update goes through the update codec and
the server's arrival check (names and shapes of the plan's trainable parameters, the federation's
bounds), and the server's ``aggregate_head`` with the strategy its configuration names makes the next
global head. Embeddings stand in for the case files (each clinic's cases embedded once by the
bundle's encoders, as its cache would hold them); nothing else is simulated.
``tests/test_federation_gain.py`` checks that a simulated round equals one round through
`edge-server` and `edge-run sync` on loopback.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_runtime.finetune.head import Params, losses
from edge_runtime.finetune.plan import FinetunePlan, trainable_subset
from edge_runtime.finetune.run import FinetuneOptions, released_sigma, train_round, update_delta, validation_split
from edge_runtime.privacy.accountant import RoundEvents, epsilon, plan_round
from edge_runtime.sync import update as codec
from federation.aggregation import ClientUpdate, UpdateMeta

from .home import Config
from .rounds import aggregate_head
from .service import configured_strategy


@dataclass
class SimClinic:
    """One clinic: its labelled cases as embeddings (manifest order) and its ledger's rounds."""

    name: str
    case_ids: list[str]
    emb: np.ndarray  # (n, M, d) float32
    mask: np.ndarray  # (n, M)
    labels: np.ndarray  # (n,) int64
    rounds: list[RoundEvents] = field(default_factory=list)

    def split(self, val_fraction: float) -> np.ndarray:
        return validation_split(self.name, self.case_ids, self.labels, val_fraction)

    def spent(self, delta: float) -> float:
        return epsilon(self.rounds, delta)


def clinic_round(clinic: SimClinic, start: Params, plan: FinetunePlan, rng: np.random.Generator, *,
                 opts: FinetuneOptions = FinetuneOptions(), epsilon_total: float = 0.5, delta: float = 1e-5,
                 private: bool = True) -> tuple[Params, dict]:
    """The clinic's round on ``start``: (update delta, released metadata); the round is charged to
    ``clinic.rounds``. ``private=False``: the same clipped steps without noise, exact metadata (the ceiling)."""
    val = clinic.split(opts.val_fraction)
    tr, va = np.flatnonzero(~val), np.flatnonzero(val)
    budget = plan_round(clinic.rounds, len(tr), plan.batch_size, plan.epochs, opts.meta_noise, epsilon_total, delta,
                        None, rounds_left=plan.rounds_left(len(clinic.rounds)))
    events = budget.events
    clinic.rounds.append(events)
    emb, mask, labels = clinic.emb, clinic.mask, clinic.labels

    def read(idx: np.ndarray):
        return emb[tr[idx]], mask[tr[idx]], labels[tr[idx]]

    val_losses = losses(start, emb[va], mask[va].astype(np.float32), labels[va])
    if not private:  # same steps, sampling and clipping; no noise, exact metadata
        events = RoundEvents(events.sampling_rate, 0.0, events.steps, 0.0)
    new, meta = train_round(start, plan=plan, events=events, n_train=len(tr), read=read, rng=rng,
                            modality_counts=mask[tr].sum(axis=0), n_val=len(va), val_losses=val_losses, loss_clip=opts.loss_clip)
    meta = {**meta, "noise_multiplier": released_sigma(events.noise_multiplier) if private else 0.0}
    return update_delta(new, start, plan), meta


def server_round(config: Config, global_params: Params, plan: FinetunePlan, updates: list[tuple[str, Params, dict]],
                 state: dict[str, np.ndarray] | None = None, *, ceiling: bool = False):
    """The server's side of a round: each update encoded, decoded and checked as on arrival (the
    federation's bounds; ``ceiling``: noise-free updates let through), then aggregated by the
    configured strategy from ``state`` (what it kept after the round before, as the server saves it
    with each version; None: the first round). The result and the strategy's new state."""
    reference = trainable_subset(global_params, plan)
    bounds = codec.Bounds(max_n=config.max_n, min_noise_multiplier=0.0 if ceiling else config.min_noise_multiplier,
                          max_abs=config.max_update_abs)
    arrived = []
    for name, delta, meta in updates:
        update = codec.decode(codec.encode(delta, meta))
        summary = codec.validate(update, reference, bounds=bounds)
        arrived.append(ClientUpdate(UpdateMeta(client=name, n=summary.n, val_loss=summary.val_loss,
                                               modality_fraction=summary.modality_fraction,
                                               noise_multiplier=summary.noise_multiplier),
                                    summary.norm, lambda d=update.delta: d))
    strategy = configured_strategy(config, reference, state)
    result = aggregate_head(strategy, global_params, arrived, plan)
    return result, strategy.state_dict()
