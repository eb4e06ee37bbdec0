"""Federated teacher training, simulated: each site trains only on its own cases, the server
aggregates with a strategy from ``federation.aggregation`` (the same function the server uses).

Per round and site: the local validation loss of the current global model (L_k) is measured before
training, the site trains for ``local_epochs`` (FedProx adds its proximal term), and sends
Delta_k = theta_k - theta_t with n_k and its modality fractions r_k[m]. BatchNorm running
statistics are buffers, not parameters: they stay local to each site (FedBN-style) and the global
model keeps the data-weighted mean of them for evaluation.
"""

from __future__ import annotations

import dataclasses
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
from edge_runtime.progress import progress
from edge_runtime.synthetic import SynthConfig, SyntheticCohort
from federation.aggregation import DEFAULT_STRATEGY, ClientUpdate, Strategy, UpdateMeta, build_strategy
from federation.teacher import branch_of

from .config import PipelineConfig, TrainConfig
from .data import ConcatCases, PreparedCases
from .models import Teacher
from .stats import fit_preprocessing
from .train import (
    Log,
    augment,
    drop_modalities,
    load_pretrained,
    teacher_loss,
    train_teacher,
)

SITE_STRIDE = 100_000  # site k's training cases are k*SITE_STRIDE + i; validation / test from the offsets on
VAL_OFFSET, TEST_OFFSET = 50_000, 75_000
CHECKPOINT = "federated.pt"
LOG = "rounds.jsonl"


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
            if k in params:  # FedBN: normalisation layers are not among the shared parameters
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
    """Local epochs on one site; ``mu`` > 0 adds FedProx's proximal term to the global weights.
    Every random draw follows ``seed`` (dropout too): a hospital process makes the same update as
    the simulation's site."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    anchor = [p.detach().clone() for p in model.parameters()] if mu > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(site.train))
        for batch in site.train.batches(order, cfg.batch_size):
            inputs = augment(batch.inputs, gen) if cfg.augment else batch.inputs
            mask = drop_modalities(batch.mask, cfg.modality_dropout, gen).to(device)
            batch = dataclasses.replace(batch, inputs=inputs).to(device)
            loss = teacher_loss(model, batch, mask, cfg)
            if anchor is not None:
                loss = loss + mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
            opt.zero_grad()
            loss.backward()
            opt.step()


@dataclass
class SiteStep:
    delta: dict[str, np.ndarray]  # theta_site - theta_global over the shared parameters
    meta: dict  # n, val_loss, modality_fraction: UpdateMeta's fields besides the client's name
    auc_before: float  # the global model's AUC on the site's validation cases
    norm_state: dict[str, torch.Tensor]  # the site's normalisation layers after training (FedBN)


def site_round(model: Teacher, site: Site, global_params: dict[str, np.ndarray], *, cfg: TrainConfig, epochs: int,
               mu: float, seed: int, norms: set[str], device: str = "cpu") -> SiteStep:
    """One site's part of a round, on ``model`` already holding the global teacher as the site runs
    it: L_k measured before training, local epochs, the delta over ``global_params``' names. The
    simulation and a hospital process (export.hospital) both run exactly this."""
    val_loss, auc = evaluate_site(model, site.val, cfg.batch_size, device)
    local_train(model, site, cfg, epochs, mu, seed=seed, device=device)
    trained = _params(model)
    delta = {k: trained[k] - v for k, v in global_params.items()}
    state = model.state_dict()
    return SiteStep(delta, {"n": len(site.train), "val_loss": val_loss, "modality_fraction": site.modality_fraction}, auc,
                    {k: state[k].detach().clone() for k in norms})


def norm_names(model: torch.nn.Module) -> set[str]:
    """State-dict names of every normalisation layer's tensors (affine weights and running statistics)."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)):
            names.update(f"{prefix}.{k}" for k, _ in module.state_dict().items())
    return names


def _weighted_mean(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    total = sum(weights)
    out = {}
    for name, first in states[0].items():
        if first.dtype.is_floating_point:
            out[name] = sum(w / total * s[name] for w, s in zip(weights, states))
        else:  # num_batches_tracked
            out[name] = max(s[name] for s in states)
    return out


@dataclass(frozen=True)
class FederationSpec:
    sites: int
    rounds: int
    strategy: str = DEFAULT_STRATEGY
    local_epochs: int = 1
    cases_per_site: int = 120
    val_per_site: int = 40
    test_per_site: int = 0
    beta: float = 0.3
    temperature: float = 1.0  # DW-FL dynamic share
    dynamic: str = "loss"  # DW-FL dynamic term: "loss" (DESIGN §4) or "relative" (L_k / mean L)
    mu: float = 0.01  # FedProx
    label_alpha: float | None = None  # Dirichlet label skew across sites (None: the cohort's mild default)
    local_norm: bool = True  # FedBN: normalisation layers stay at each site, never averaged
    device: str = "cpu"
    init_checkpoint: Path | None = None  # local pretrained weights (transfer learning); never downloaded
    strategy_options: tuple[tuple[str, float], ...] = ()  # further constructor settings, e.g. (("eta", 2.0),)
    site_cases: tuple[int, ...] = ()  # training cases per site, overriding cases_per_site (a small site)
    prevalence: tuple[tuple[int, float], ...] = ()  # (site, prevalence) overriding the cohort's profile
    dp_epsilon: float | None = None  # record-level DP at every site (export.hospital_dp): lifetime epsilon; None: off
    dp_round_epsilon: float | None = None  # at most this much per round (None: dp_epsilon / rounds)
    dp_delta: float = 1e-5

    def train_cases(self, site: int) -> int:
        return self.site_cases[site] if site < len(self.site_cases) else self.cases_per_site


# The spec's own fields each strategy takes (the rest come through strategy_options).
SPEC_SETTINGS = {"dwfl": ("beta", "temperature", "dynamic"), "fedprox": ("mu",), "dwfl_mw": ("beta",), "dwfl_pow": ("beta",)}


def make_strategy(spec: FederationSpec) -> Strategy:
    options = {k: getattr(spec, k) for k in SPEC_SETTINGS.get(spec.strategy, ())}
    options.update(dict(spec.strategy_options))
    return build_strategy(spec.strategy, options)


def run_federation(
    out: Path, cfg: PipelineConfig, spec: FederationSpec, seed: int = 0, resume: bool = False, log: Log = print
) -> dict:
    """Simulate ``spec.rounds`` rounds on a synthetic cohort whose cases are pinned to their sites;
    checkpoint and log (JSON lines) after every round."""
    if spec.sites < 1 or spec.rounds < 1:
        raise BadInput("need at least one site and one round")
    make_strategy(spec)  # fail on a bad strategy before preparing data
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".cases-") as work:
        cohort, pre = prepare_cohort(cfg, spec, seed)
        sites = prepare_sites(cohort, pre, spec, Path(work))
        torch.manual_seed(seed)
        model = Teacher(cfg.model, cfg.input.n_genes, len(cfg.classes), cfg.train.contrastive_temperature)
        if spec.init_checkpoint is not None:
            loaded, skipped = load_pretrained(model, spec.init_checkpoint)
            log(f"initialised {loaded} tensors from {spec.init_checkpoint} ({skipped} kept their initialisation)")
        fed = Federation(model, sites, spec, cfg.train, seed, out, log)
        fed.run(resume)
        return {"rounds": fed.history, "checkpoint": str(out / CHECKPOINT), "test_auc": fed.test_auc(),
                "preprocessing": pre.to_dict()}


class Federation:
    """The rounds of one federation over in-memory sites: local training, DW-FL (or a baseline)
    aggregation of the shared parameters, FedBN-style local normalisation, a checkpoint and a JSON
    line per round. The model ends on CPU holding the global parameters (normalisation: the
    data-weighted mean of the sites' own, for a clinic the federation has not seen)."""

    def __init__(self, model: Teacher, sites: list[Site], spec: FederationSpec, cfg: TrainConfig, seed: int,
                 out: Path, log: Log = print) -> None:
        self.model, self.sites, self.spec, self.cfg, self.seed, self.out, self.log = model, sites, spec, cfg, seed, out, log
        self.strategy = make_strategy(spec)
        self.norms = norm_names(model)
        self.site_norms: dict[int, dict[str, torch.Tensor]] = {}
        self.history: list[dict] = []

    def _shared(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v for k, v in params.items() if not (self.spec.local_norm and k in self.norms)}

    def _at_site(self, global_state: dict[str, torch.Tensor], site: Site) -> None:
        """The global model as site ``site`` sees it: its own normalisation layers under FedBN."""
        self.model.load_state_dict(global_state)
        own = self.site_norms.get(site.index) if self.spec.local_norm else None
        if own:
            self.model.load_state_dict(own, strict=False)

    def run(self, resume: bool = False) -> None:
        spec, model, device = self.spec, self.model, self.spec.device
        model.to(device)
        self.out.mkdir(parents=True, exist_ok=True)
        start, ckpt, log_path = 0, self.out / CHECKPOINT, self.out / LOG
        if resume and ckpt.exists():
            start = self._restore(ckpt)
            self.log(f"resumed after round {start}")
        elif log_path.exists():
            log_path.unlink()
        mu = self.strategy.client_config().proximal_mu  # what every site must do locally
        bs = self.cfg.batch_size
        with progress(f"federated rounds ({spec.strategy})", (spec.rounds - start) * len(self.sites)) as advance:
            self._rounds(start, mu, bs, device, ckpt, log_path, advance)
        model.to("cpu").eval()

    def _rounds(self, start: int, mu: float, bs: int, device: str, ckpt: Path, log_path: Path, advance) -> None:
        spec, model = self.spec, self.model
        for rnd in range(start, spec.rounds):
            global_params = self._shared(_params(model))
            global_state = {k: v.clone() for k, v in model.state_dict().items()}
            updates, site_state, auc_before = [], [], {}
            for site in self.sites:
                self._at_site(global_state, site)
                seed = self.seed * 1000 + rnd * 100 + site.index
                noise = 0.0
                if spec.dp_epsilon is None:
                    step = site_round(model, site, global_params, cfg=self.cfg, epochs=spec.local_epochs, mu=mu, seed=seed,
                                      norms=self.norms, device=device)
                else:
                    step, privacy = self._dp_round(site, global_params, rnd, seed)
                    noise = privacy["released_noise_multiplier"]
                auc_before[site.index] = step.auc_before
                updates.append(ClientUpdate.in_memory(UpdateMeta(f"site{site.index}", **step.meta, noise_multiplier=noise), step.delta))
                site_state.append(step.norm_state)
                advance(1)
            result = self.strategy.aggregate(global_params, updates, branch_of)
            model.load_state_dict(global_state)
            _load_params(model, result.params)
            sizes = [len(s.train) for s in self.sites]
            if spec.local_norm:
                self.site_norms = {s.index: st for s, st in zip(self.sites, site_state)}
                model.load_state_dict(_weighted_mean(site_state, sizes), strict=False)
            else:  # affine weights were averaged with the rest; running statistics: data-weighted mean
                stats = [{k: v for k, v in st.items() if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
                         for st in site_state]
                model.load_state_dict(_weighted_mean(stats, sizes), strict=False)
            global_state = {k: v.clone() for k, v in model.state_dict().items()}
            site_auc = {f"site{s.index}": round(self._site_auc(global_state, s, s.val), 4) for s in self.sites}
            model.load_state_dict(global_state)
            record = {"round": rnd + 1, "strategy": spec.strategy, "val_auc": site_auc,
                      "val_auc_before": {f"site{k}": round(v, 4) for k, v in auc_before.items()},
                      "weights": result.weights["shared"], "rejected": result.rejected,
                      "clip_bound": round(result.clip_bound, 6), "norms": {k: round(v, 6) for k, v in result.norms.items()}}
            self.history.append(record)
            self._checkpoint(ckpt, rnd + 1)
            with open(log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            self.log(f"round {rnd + 1}/{spec.rounds}: val AUC " + " ".join(f"{k} {v:.3f}" for k, v in site_auc.items())
                     + "  weights " + " ".join(f"{k} {v:.2f}" for k, v in result.weights["shared"].items()))

    def _dp_round(self, site: Site, global_params: dict[str, np.ndarray], rnd: int, seed: int):
        """A site's round under DP-SGD (Opacus), charged to the site's own ledger in OUT/privacy/."""
        from edge_runtime.privacy.ledger import Ledger

        from .hospital_dp import DPOptions, dp_site_round

        spec = self.spec
        if not spec.local_norm:
            raise BadInput("DP at a site needs local normalisation layers (FedBN): batch statistics are outside the clipped gradients")
        ledger = Ledger(self.out / "privacy" / f"site{site.index}", f"site{site.index}", "teacher",
                        epsilon_total=spec.dp_epsilon, delta=spec.dp_delta)
        opts = DPOptions(epsilon_total=spec.dp_epsilon, delta=spec.dp_delta,
                         round_epsilon=spec.dp_round_epsilon or spec.dp_epsilon / spec.rounds)
        return dp_site_round(self.model, site, global_params, cfg=self.cfg, epochs=spec.local_epochs, seed=seed,
                             norms=self.norms if spec.local_norm else set(), ledger=ledger, round_id=f"r{rnd + 1}", opts=opts,
                             noise_seed=seed)  # a simulation is reproducible; a hospital's noise is not (hospital_dp)

    def _site_auc(self, global_state: dict[str, torch.Tensor], site: Site, data) -> float:
        self._at_site(global_state, site)
        return evaluate_site(self.model, data, self.cfg.batch_size, self.spec.device)[1]

    def test_auc(self) -> dict[str, float]:
        """Each site's held-out test AUC of the final model as that site runs it."""
        self.model.to(self.spec.device)
        global_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        out = {f"site{s.index}": round(self._site_auc(global_state, s, s.test), 4) for s in self.sites if s.test}
        self.model.load_state_dict(global_state)
        self.model.to("cpu")
        return out

    def _checkpoint(self, path: Path, rnd: int) -> None:
        buf = io.BytesIO()
        torch.save({
            "model": {k: v.cpu() for k, v in self.model.state_dict().items()},
            "round": rnd,
            "strategy": self.strategy.name,
            "strategy_state": {k: torch.from_numpy(np.asarray(v)) for k, v in self.strategy.state_dict().items()},
            "site_norms": {str(k): {n: t.cpu() for n, t in v.items()} for k, v in self.site_norms.items()},
        }, buf)
        write_atomic(path, buf.getvalue())

    def _restore(self, path: Path) -> int:
        state = torch.load(path, map_location=self.spec.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        saved = state.get("strategy", self.strategy.name)
        if saved != self.strategy.name:
            raise BadInput(f"{path}: checkpoint of a {saved!r} federation, not {self.strategy.name!r}: resume with the same strategy")
        strategy_state = state.get("strategy_state")
        if strategy_state is None and state.get("velocity"):  # checkpoints written before strategy_state
            strategy_state = {f"velocity/{k}": v for k, v in state["velocity"].items()}
        self.strategy.load_state_dict({k: v.cpu().numpy() for k, v in (strategy_state or {}).items()})
        self.site_norms = {int(k): v for k, v in (state.get("site_norms") or {}).items()}
        return int(state["round"])


def prepare_cohort(cfg: PipelineConfig, spec: FederationSpec, seed: int) -> tuple[SyntheticCohort, Preprocessing]:
    cohort = SyntheticCohort(SynthConfig(seed=seed, n_sites=spec.sites, spec=cfg.input, label_alpha=spec.label_alpha))
    for site, prevalence in spec.prevalence:
        if not (0 <= site < spec.sites and 0.0 < prevalence < 1.0):
            raise BadInput(f"prevalence override ({site}, {prevalence}): needs a site in [0, {spec.sites}) and 0 < p < 1")
        cohort.sites[site] = dataclasses.replace(cohort.sites[site], prevalence=float(prevalence))
    pre = fit_preprocessing(
        (cohort.case(k * SITE_STRIDE + i, site=k) for k in range(spec.sites) for i in range(min(16, spec.train_cases(k)))),
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
        sites.append(Site(k, cases("train", 0, spec.train_cases(k)), cases("val", VAL_OFFSET, spec.val_per_site), test))
    return sites


class _Pinned:
    """A cohort view whose cases all come from one site."""

    def __init__(self, cohort: SyntheticCohort, site: int) -> None:
        self.cohort, self.site = cohort, site

    def case(self, index: int):
        return self.cohort.case(index, site=self.site)


def _site_cases(cohort: SyntheticCohort, pre: Preprocessing, folder: Path, indices: range, site: int) -> PreparedCases:
    return PreparedCases(folder, _Pinned(cohort, site), pre, indices)


BASELINES = ("centralized", "local")


def run_baseline(out: Path, cfg: PipelineConfig, spec: FederationSpec, seed: int = 0, log: Log = print) -> dict:
    """The federation's reference points on the very same site caches: ``centralized`` (all sites'
    cases pooled, which federation exists to avoid) and ``local`` (each site alone). Both train for
    rounds x local epochs epochs and keep their best validation epoch."""
    if spec.strategy not in BASELINES:
        raise BadInput(f"unknown baseline {spec.strategy!r}: choose one of {', '.join(BASELINES)}")
    out.mkdir(parents=True, exist_ok=True)
    train_cfg = dataclasses.replace(cfg.train, teacher_epochs=spec.rounds * spec.local_epochs)

    def new_teacher() -> Teacher:
        torch.manual_seed(seed)
        model = Teacher(cfg.model, cfg.input.n_genes, len(cfg.classes), cfg.train.contrastive_temperature)
        if spec.init_checkpoint is not None:
            load_pretrained(model, spec.init_checkpoint)
        return model

    with tempfile.TemporaryDirectory(dir=out, prefix=".cases-") as work:
        cohort, pre = prepare_cohort(cfg, spec, seed)
        sites = prepare_sites(cohort, pre, spec, Path(work))
        models: dict[int, Teacher] = {}
        if spec.strategy == "centralized":
            pooled = train_teacher(new_teacher(), ConcatCases([s.train for s in sites]), ConcatCases([s.val for s in sites]),
                                   train_cfg, seed, log, spec.device)
            models = {s.index: pooled for s in sites}
            _save(out / CHECKPOINT, {"model": pooled.state_dict(), "strategy": "centralized"})
        else:
            for s in sites:
                models[s.index] = train_teacher(new_teacher(), s.train, s.val, train_cfg, seed + 100 + s.index, log, spec.device)
                _save(out / f"local_site{s.index}.pt", {"model": models[s.index].state_dict(), "strategy": "local"})
        bs = cfg.train.batch_size
        val_auc = {f"site{s.index}": round(evaluate_site(models[s.index], s.val, bs)[1], 4) for s in sites}
        test_auc = {f"site{s.index}": round(evaluate_site(models[s.index], s.test, bs)[1], 4) for s in sites if s.test}
    record = {"strategy": spec.strategy, "val_auc": val_auc}
    write_atomic(out / LOG, (json.dumps(record) + "\n").encode())
    return {"rounds": [record], "test_auc": test_auc}


def _save(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(path, buf.getvalue())
