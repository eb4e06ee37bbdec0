"""Record-level differential privacy at a hospital (issue 16, optional per hospital): DP-SGD with
Opacus on the teacher, charged to the same privacy ledger the clinics use (DESIGN §5): the round is
planned inside the lifetime budget (``accountant.plan_round``), charged and fsynced before training,
and refused (nothing trained, nothing sent) once the budget is spent.

What changes under DP, and why:
- Per-case gradients (Opacus' GradSampleModule) clipped to ``clip``, Gaussian noise sigma x clip on
  their sum, Poisson sampling at q = batch / n: the mechanism the ledger's RDP accountant composes.
- The contrastive alignment term is off: InfoNCE couples the cases of a batch, so clipping one case's
  gradient would not bound its influence on the others'.
- Normalisation layers are frozen in evaluation mode (FedBN keeps them local anyway): batch
  statistics would mix the cases of a batch outside the clipped gradients.
- Every encoder runs on every row of a batch (absent modalities as zeros, masked after), so every
  layer sees the whole batch: what per-case gradients need.
- The released metadata (n, modality fractions, validation loss) goes through the clinic's Gaussian
  mechanism (``noisy_metadata``), the released sigma coarsened as the clinic's.
"""

from __future__ import annotations

import secrets
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from edge_runtime import MODALITIES
from edge_runtime.errors import BadInput, Refused
from edge_runtime.finetune.run import noisy_metadata, released_sigma
from edge_runtime.privacy.accountant import BudgetExhausted, epsilon, plan_round
from edge_runtime.privacy.ledger import Ledger

from .config import TrainConfig
from .federated import Site, SiteStep, evaluate_site
from .models import Teacher
from .train import augment, drop_modalities


@dataclass(frozen=True)
class DPOptions:
    epsilon_total: float | None = None  # lifetime; None: the ledger's recorded one (first use: the clinic default 0.5)
    delta: float | None = None
    round_epsilon: float | None = None  # this round adds at most this much
    clip: float = 1.0
    meta_noise: float = 20.0
    loss_clip: float = 5.0

    def check(self) -> None:
        if self.epsilon_total is not None and not (0 < self.epsilon_total <= 100):
            raise BadInput(f"--dp-epsilon {self.epsilon_total} must be in (0, 100]")
        if self.round_epsilon is not None and not (0 < self.round_epsilon <= 100):
            raise BadInput(f"--dp-round-epsilon {self.round_epsilon} must be in (0, 100]")
        if not (self.clip > 0 and self.meta_noise > 0 and self.loss_clip > 0):
            raise BadInput("DP clip, metadata noise and loss clip must be > 0")


class _Rows(torch.utils.data.Dataset):
    """A site's prepared training cases, one row per item (what Opacus' Poisson sampler draws)."""

    def __init__(self, cases) -> None:
        self.cases = cases

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int):
        batch = next(iter(self.cases.batches(np.array([i]), 1)))
        return ({m: batch.inputs[m][0] for m in MODALITIES}, batch.mask[0], batch.labels[0], batch.risk[0])


def case_losses(model: Teacher, data, batch_size: int) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for batch in data.batches(np.arange(len(data)), batch_size):
            logits, _ = model(batch.inputs, batch.mask)
            out.append(F.cross_entropy(logits, batch.labels, reduction="none").numpy())
    return np.concatenate(out) if out else np.zeros(0)


def dp_site_round(model: Teacher, site: Site, global_params: dict[str, np.ndarray], *, cfg: TrainConfig, epochs: int,
                  seed: int, norms: set[str], ledger: Ledger, round_id: str, opts: DPOptions,
                  noise_seed: int | None = None, register=lambda: None) -> tuple[SiteStep, dict]:
    """One site's DP round on ``model`` (the global teacher as the site runs it): plan, charge, then
    DP-SGD; the SiteStep (its meta the noised release) and the privacy figures for the report.
    ``seed`` drives what may be public (augmentation, modality dropout, dropout); the sampling and
    every noise draw come from ``noise_seed``, which only a simulation fixes: None (a hospital) takes
    OS entropy, or whoever knows the seed could subtract the noise."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    opts.check()
    n = len(site.train)
    _, auc_before = evaluate_site(model, site.val, cfg.batch_size)
    val_losses = case_losses(model, site.val, cfg.batch_size)
    try:
        plan = plan_round(ledger.rounds, n, cfg.batch_size, epochs, opts.meta_noise, ledger.epsilon_total, ledger.delta,
                          opts.round_epsilon)
    except BudgetExhausted as exc:
        raise Refused(f"{exc}; nothing trained, nothing sent") from exc
    ledger.open_head()
    register()
    ledger.charge(round_id, plan.events)  # fsynced before anything derived from this round exists
    events = plan.events
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.dense = True
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(name not in norms)
        if name not in norms:
            trainable.append(p)
    wrapped = GradSampleModule(model, loss_reduction="mean")
    secret = secrets.randbits(63) if noise_seed is None else noise_seed
    optimizer = DPOptimizer(torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay),
                            noise_multiplier=events.noise_multiplier, max_grad_norm=opts.clip,
                            expected_batch_size=max(1, round(events.sampling_rate * n)), loss_reduction="mean",
                            generator=torch.Generator().manual_seed(secret))
    rows = _Rows(site.train)
    rng = np.random.default_rng([secret, 7])  # Poisson sampling and the metadata's noise
    try:
        for _ in range(events.steps):
            model.train()
            for module in model.modules():  # frozen normalisation: running statistics, no batch statistics
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()
            picked = np.flatnonzero(rng.random(n) < events.sampling_rate)  # Poisson sampling, as the accountant assumes
            optimizer.zero_grad(set_to_none=True)
            if len(picked):
                inputs, mask, labels, risk = _collate([rows[i] for i in picked])
                if cfg.augment:
                    inputs = augment(inputs, gen)
                kept = drop_modalities(mask, cfg.modality_dropout, gen)
                emb = model.embed(inputs, mask)
                fused = model.fuse(emb, kept)
                loss = F.cross_entropy(model.classifier(fused), labels)  # mean over the batch: per case, then averaged
                if cfg.aux_weight:
                    known = torch.isfinite(risk)
                    err = (model.risk_head(fused).squeeze(-1) - torch.where(known, risk, torch.zeros_like(risk))) ** 2
                    loss = loss + cfg.aux_weight * (err * known).sum() / len(picked)
                with warnings.catch_warnings():  # frozen first layers: Opacus' hooks fire on outputs only, as meant
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
            else:  # an empty Poisson batch still releases the noise alone
                for p in trainable:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
            optimizer.step()
    finally:
        wrapped._close()
        model.dense = False
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad_sample = None
    trained = {k: v.detach().cpu().numpy().copy() for k, v in model.named_parameters()}
    delta = {k: trained[k] - v for k, v in global_params.items()}
    modality_counts = site.train.mask.sum(axis=0)
    release = noisy_metadata(rng, n, modality_counts, len(site.val), val_losses, events.meta_noise_multiplier, opts.loss_clip)
    meta = {"n": release["n"], "val_loss": release["val_loss"], "modality_fraction": release["modality_fraction"]}
    state = model.state_dict()
    step = SiteStep(delta, meta, auc_before, {k: state[k].detach().clone() for k in norms})
    privacy = {"noise_multiplier": round(events.noise_multiplier, 4), "released_noise_multiplier": released_sigma(events.noise_multiplier),
               "sampling_rate": round(events.sampling_rate, 5), "steps": events.steps, "clip": opts.clip,
               "epsilon_round": round(epsilon([events], ledger.delta), 4), **ledger.summary()}
    return step, privacy


def _collate(items):
    inputs = {m: torch.stack([it[0][m] for it in items]) for m in MODALITIES}
    return inputs, torch.stack([it[1] for it in items]), torch.stack([it[2] for it in items]), torch.stack([it[3] for it in items])
