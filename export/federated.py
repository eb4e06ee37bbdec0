"""Federated teacher training, simulated: each site trains only on its own cases, the server
aggregates with a strategy from ``federation.aggregation`` (the same function the server uses).

Per round and site: the local validation loss of the current global model (L_k) is measured before
training, the site trains for ``local_epochs`` (FedProx adds its proximal term), and sends
Delta_k = theta_k - theta_t with n_k and its modality fractions r_k[m]. BatchNorm running
statistics are buffers, not parameters: they stay local to each site (FedBN-style) and the global
model keeps the data-weighted mean of them for evaluation.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edge_runtime import MODALITIES
from edge_runtime.errors import BadInput
from edge_runtime.fsutil import write_atomic
from edge_runtime.metrics import roc_auc
from edge_runtime.preprocess import Preprocessing
from edge_runtime.synthetic import SynthConfig, SyntheticCohort
from federation.aggregation import STRATEGIES, ClientUpdate, DWFL, UpdateMeta, from_list

from .config import PipelineConfig, TrainConfig
from .data import Batch, PreparedCases
from .models import Teacher
from .stats import fit_preprocessing
from .train import Log, augment, drop_modalities, load_pretrained, teacher_loss

SITE_STRIDE = 100_000  # site k's training cases are k*SITE_STRIDE + i; validation / test from the offsets on
VAL_OFFSET, TEST_OFFSET = 50_000, 75_000
CHECKPOINT = "federated.pt"
LOG = "rounds.jsonl"


def branch_of(name: str) -> str | None:
    """Which modality branch a teacher parameter belongs to (None: shared fusion / classifier)."""
    for m in MODALITIES:
        if name.startswith((f"encoders.{m}.", f"alignment.proj.{m}.")):
            return m
    return None


@dataclass
class Site:
    index: int
    train: PreparedCases
    val: PreparedCases
    test: PreparedCases | None = None  # held out from everything, for benchmarks

    @property
    def modality_fraction(self) -> dict[str, float]:
        return {m: float(self.train.mask[:, i].mean()) for i, m in enumerate(MODALITIES)}


def _params(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.named_parameters()}


def _load_params(model: torch.nn.Module, params: dict[str, np.ndarray]) -> None:
    with torch.no_grad():
        for k, v in model.named_parameters():
            v.copy_(torch.from_numpy(params[k]))


@torch.no_grad()
def evaluate_site(model: Teacher, data: PreparedCases, batch_size: int, device: str = "cpu") -> tuple[float, float]:
    """(mean cross-entropy, AUC) of ``model`` on a site's cases."""
    model.eval()
    losses, labels, scores = [], [], []
    for batch in data.batches(np.arange(len(data)), batch_size):
        batch = batch.to(device)
        logits, _ = model(batch.inputs, batch.mask)
        losses.append(float(F.cross_entropy(logits, batch.labels, reduction="sum")))
        labels.extend(batch.labels.tolist())
        scores.extend(torch.softmax(logits, -1)[:, -1].tolist())
    return sum(losses) / max(len(labels), 1), roc_auc(np.asarray(labels), np.asarray(scores))


def local_train(
    model: Teacher, site: Site, cfg: TrainConfig, epochs: int, mu: float, seed: int, device: str = "cpu"
) -> None:
    """Local epochs on one site; ``mu`` > 0 adds FedProx's proximal term to the global weights."""
    gen = torch.Generator().manual_seed(seed)
    anchor = [p.detach().clone() for p in model.parameters()] if mu > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(site.train))
        for batch in site.train.batches(order, cfg.batch_size):
            inputs = augment(batch.inputs, gen) if cfg.augment else batch.inputs
            mask = drop_modalities(batch.mask, cfg.modality_dropout, gen).to(device)
            batch = Batch(inputs, batch.mask, batch.labels, batch.case_ids).to(device)
            loss = teacher_loss(model, batch, mask, cfg)
            if anchor is not None:
                loss = loss + mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
            opt.zero_grad()
            loss.backward()
            opt.step()


def _average_buffers(model: Teacher, site_buffers: list[dict[str, torch.Tensor]], weights: list[float]) -> None:
    """Global BatchNorm statistics for evaluation: data-weighted mean of the sites' own."""
    total = sum(weights)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if buf.dtype.is_floating_point:
                buf.copy_(sum(w / total * b[name] for w, b in zip(weights, site_buffers)))


@dataclass(frozen=True)
class FederationSpec:
    sites: int
    rounds: int
    strategy: str = "dwfl"
    local_epochs: int = 1
    cases_per_site: int = 120
    val_per_site: int = 40
    test_per_site: int = 0
    beta: float = 0.3
    temperature: float = 1.0  # DW-FL dynamic share
    mu: float = 0.01  # FedProx
    label_alpha: float | None = None  # Dirichlet label skew across sites (None: the cohort's mild default)
    device: str = "cpu"
    init_checkpoint: Path | None = None  # local pretrained weights (transfer learning); never downloaded


def make_strategy(spec: FederationSpec) -> DWFL:
    if spec.strategy not in STRATEGIES:
        raise BadInput(f"unknown strategy {spec.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if spec.strategy == "dwfl":
        return STRATEGIES["dwfl"](beta=spec.beta, temperature=spec.temperature)
    if spec.strategy == "fedprox":
        return STRATEGIES["fedprox"](mu=spec.mu)
    return STRATEGIES[spec.strategy]()


def run_federation(
    out: Path, cfg: PipelineConfig, spec: FederationSpec, seed: int = 0, resume: bool = False, log: Log = print
) -> dict:
    """Simulate ``spec.rounds`` rounds; checkpoint and log (JSON lines) after every round."""
    if spec.sites < 1 or spec.rounds < 1:
        raise BadInput("need at least one site and one round")
    strategy = make_strategy(spec)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".cases-") as work:
        return _federate(out, Path(work), cfg, spec, strategy, seed, resume, log)


def _federate(
    out: Path, work: Path, cfg: PipelineConfig, spec: FederationSpec, strategy: DWFL, seed: int, resume: bool, log: Log
) -> dict:
    cohort, pre = prepare_cohort(cfg, spec, seed)
    sites = prepare_sites(cohort, pre, spec, work)
    torch.manual_seed(seed)
    model = Teacher(cfg.model, cfg.input.n_genes, len(cfg.classes), cfg.train.contrastive_temperature)
    if spec.init_checkpoint is not None:
        loaded, skipped = load_pretrained(model, spec.init_checkpoint)
        log(f"initialised {loaded} tensors from {spec.init_checkpoint} ({skipped} kept their initialisation)")
    model.to(spec.device)
    start = 0
    ckpt = out / CHECKPOINT
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location=spec.device, weights_only=True)
        model.load_state_dict(state["model"])
        if hasattr(strategy, "velocity") and state.get("velocity"):
            strategy.velocity = {k: v.numpy() for k, v in state["velocity"].items()}
        start = state["round"]
        log(f"resumed after round {start}")
    elif (out / LOG).exists():
        (out / LOG).unlink()
    history = []
    device = spec.device
    for rnd in range(start, spec.rounds):
        global_params = _params(model)
        global_state = {k: v.clone() for k, v in model.state_dict().items()}
        updates, site_buffers, auc_before = [], [], {}
        for site in sites:
            val_loss, auc_before[site.index] = evaluate_site(model, site.val, cfg.train.batch_size, device)
            local_train(model, site, cfg.train, spec.local_epochs, strategy.mu if hasattr(strategy, "mu") else 0.0,
                        seed=seed * 1000 + rnd * 100 + site.index, device=device)
            delta = {k: v - global_params[k] for k, v in _params(model).items()}
            meta = UpdateMeta(f"site{site.index}", len(site.train), val_loss, site.modality_fraction)
            updates.append(ClientUpdate(meta, delta))
            site_buffers.append({k: v.clone() for k, v in model.named_buffers()})
            model.load_state_dict(global_state)
        result = strategy.aggregate(global_params, from_list(updates), branch_of)
        _load_params(model, result.params)
        _average_buffers(model, site_buffers, [len(s.train) for s in sites])
        site_auc = {f"site{s.index}": round(evaluate_site(model, s.val, cfg.train.batch_size, device)[1], 4) for s in sites}
        record = {"round": rnd + 1, "strategy": spec.strategy, "val_auc": site_auc,
                  "val_auc_before": {f"site{k}": round(v, 4) for k, v in auc_before.items()},
                  "weights": result.weights["shared"], "rejected": result.rejected, "clip_bound": round(result.clip_bound, 6)}
        history.append(record)
        _checkpoint(ckpt, model, strategy, rnd + 1)
        with open(out / LOG, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        log(f"round {rnd + 1}/{spec.rounds}: val AUC " + " ".join(f"{k} {v:.3f}" for k, v in site_auc.items())
            + "  weights " + " ".join(f"{k} {v:.2f}" for k, v in result.weights["shared"].items()))
    test_auc = {f"site{s.index}": round(evaluate_site(model, s.test, cfg.train.batch_size, device)[1], 4) for s in sites if s.test}
    return {"rounds": history, "checkpoint": str(ckpt), "test_auc": test_auc}


def prepare_cohort(cfg: PipelineConfig, spec: FederationSpec, seed: int) -> tuple[SyntheticCohort, Preprocessing]:
    cohort = SyntheticCohort(SynthConfig(seed=seed, n_sites=spec.sites, spec=cfg.input, label_alpha=spec.label_alpha))
    pre = fit_preprocessing(
        (cohort.case(k * SITE_STRIDE + i, site=k) for k in range(spec.sites) for i in range(min(16, spec.cases_per_site))),
        cfg.input,
    )
    return cohort, pre


def prepare_sites(cohort: SyntheticCohort, pre: Preprocessing, spec: FederationSpec, folder: Path) -> list[Site]:
    """Each site's own cases only (non-IID by construction of the cohort's site profiles)."""
    sites = []
    for k in range(spec.sites):
        base = k * SITE_STRIDE

        def cases(split: str, start: int, count: int) -> PreparedCases:
            return _site_cases(cohort, pre, folder / f"site{k}" / split, range(base + start, base + start + count), k)

        test = cases("test", TEST_OFFSET, spec.test_per_site) if spec.test_per_site else None
        sites.append(Site(k, cases("train", 0, spec.cases_per_site), cases("val", VAL_OFFSET, spec.val_per_site), test))
    return sites


class _Pinned:
    """A cohort view whose cases all come from one site."""

    def __init__(self, cohort: SyntheticCohort, site: int) -> None:
        self.cohort, self.site = cohort, site

    def case(self, index: int):
        return self.cohort.case(index, site=self.site)


def _site_cases(cohort: SyntheticCohort, pre: Preprocessing, folder: Path, indices: range, site: int) -> PreparedCases:
    return PreparedCases(folder, _Pinned(cohort, site), pre, indices)


def _checkpoint(path: Path, model: Teacher, strategy: DWFL, rnd: int) -> None:
    velocity = getattr(strategy, "velocity", None)
    buf = io.BytesIO()
    torch.save({
        "model": model.state_dict(),
        "round": rnd,
        "velocity": {k: torch.from_numpy(v) for k, v in velocity.items()} if velocity else None,
    }, buf)
    write_atomic(path, buf.getvalue())
