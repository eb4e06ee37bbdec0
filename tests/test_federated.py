"""Federated teacher simulation on micro data: rounds, logs, checkpoints, resume, strategies."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_runtime.errors import BadInput
from export.config import MICRO
from export.federated import LOG, FederationSpec, branch_of, run_federation

CFG = MICRO.with_train(batch_size=8)


def test_branch_of_teacher_parameters():
    assert branch_of("encoders.ct.stem.0.weight") == "ct"
    assert branch_of("alignment.proj.genomics.0.weight") == "genomics"
    assert branch_of("fusion.v.weight") is None and branch_of("classifier.0.bias") is None


def test_rounds_log_checkpoint_and_resume(tmp_path):
    spec = FederationSpec(sites=2, rounds=2, strategy="dwfl", cases_per_site=16, val_per_site=12)
    logs: list[str] = []
    result = run_federation(tmp_path, CFG, spec, seed=0, log=logs.append)
    rounds = [json.loads(line) for line in (tmp_path / LOG).read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2] == [r["round"] for r in result["rounds"]]
    for r in rounds:
        assert set(r["val_auc"]) == {"site0", "site1"}
        assert sum(r["weights"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["rejected"] == []
    assert (tmp_path / "federated.pt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cases")], "case caches removed"
    more = FederationSpec(sites=2, rounds=3, strategy="dwfl", cases_per_site=16, val_per_site=12)
    logs.clear()
    run_federation(tmp_path, CFG, more, seed=0, resume=True, log=logs.append)
    assert logs[0] == "resumed after round 2"
    assert [json.loads(line)["round"] for line in (tmp_path / LOG).read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedavgm"])
def test_baselines_run(tmp_path, strategy):
    spec = FederationSpec(sites=2, rounds=1, strategy=strategy, cases_per_site=12, val_per_site=8)
    (record,) = run_federation(tmp_path, CFG, spec, seed=1, log=lambda _: None)["rounds"]
    weights = np.array(list(record["weights"].values()))
    assert np.allclose(weights, [0.5, 0.5], atol=1e-6), "equal data shares: FedAvg-style weights"


def test_bad_spec_refused(tmp_path):
    with pytest.raises(BadInput, match="unknown strategy"):
        run_federation(tmp_path, CFG, FederationSpec(sites=2, rounds=1, strategy="magic"))
    with pytest.raises(BadInput, match="at least one"):
        run_federation(tmp_path, CFG, FederationSpec(sites=0, rounds=1))


def test_pretrained_checkpoint_transfer(tmp_path):
    import torch

    from export.models import Teacher
    from export.train import load_pretrained

    spec = FederationSpec(sites=2, rounds=1, cases_per_site=8, val_per_site=8)
    run_federation(tmp_path / "a", CFG, spec, seed=0, log=lambda _: None)
    source = Teacher(MICRO.model, MICRO.input.n_genes, 2)
    source.load_state_dict(torch.load(tmp_path / "a" / "federated.pt", weights_only=True)["model"])
    # Transfer into a model with a different class count: everything but the last layer loads.
    target = Teacher(MICRO.model, MICRO.input.n_genes, 3)
    loaded, skipped = load_pretrained(target, tmp_path / "a" / "federated.pt")
    assert loaded > 0 and skipped == 2  # classifier.3.weight / bias have another shape
    assert torch.equal(target.encoders["ct"].stem[0].weight, source.encoders["ct"].stem[0].weight)
    logs: list[str] = []
    run_federation(tmp_path / "b", CFG, FederationSpec(sites=1, rounds=1, cases_per_site=8, val_per_site=8,
                                                       init_checkpoint=tmp_path / "a" / "federated.pt"), log=logs.append)
    assert logs[0].startswith("initialised") and "0 kept" in logs[0]


def test_bad_checkpoint_refused(tmp_path):
    from export.models import Teacher
    from export.train import load_pretrained

    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BadInput, match="not a readable torch checkpoint"):
        load_pretrained(Teacher(MICRO.model, MICRO.input.n_genes, 2), tmp_path / "x.pt")
    import torch

    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "y.pt")
    with pytest.raises(BadInput, match="no tensor"):
        load_pretrained(Teacher(MICRO.model, MICRO.input.n_genes, 2), tmp_path / "y.pt")


def test_export_pipeline_starts_from_the_federated_teacher(tmp_path):
    from export.pipeline import run_pipeline

    run_federation(tmp_path / "fl", CFG, FederationSpec(sites=2, rounds=1, cases_per_site=8, val_per_site=8), log=lambda _: None)
    logs: list[str] = []
    result = run_pipeline(tmp_path / "out", MICRO.with_train(teacher_epochs=1, student_epochs=1), seed=0,
                          init_checkpoint=tmp_path / "fl" / "federated.pt", log=logs.append)
    assert any(line.startswith("teacher: ") and "0 initialised fresh" in line for line in logs)
    assert (result.bundle_dir / "manifest.json").is_file()


def test_pooled_cases_view_reads_every_site(tmp_path):
    from export.data import ConcatCases
    from export.federated import prepare_cohort, prepare_sites

    spec = FederationSpec(sites=2, rounds=1, cases_per_site=5, val_per_site=3, test_per_site=4)
    cohort, pre = prepare_cohort(CFG, spec, seed=0)
    sites = prepare_sites(cohort, pre, spec, tmp_path)
    assert all(len(s.test) == 4 for s in sites)
    pooled = ConcatCases([s.train for s in sites])
    assert len(pooled) == 10
    (batch,) = list(pooled.batches(np.arange(10), 10))
    assert batch.case_ids == sites[0].train.case_ids + sites[1].train.case_ids
    assert np.array_equal(batch.inputs["genomics"][7].numpy(), sites[1].train.arrays["genomics"][2].astype(np.float32))


def test_fedbn_keeps_each_sites_normalisation_local(tmp_path):
    import torch

    from export.federated import Federation, norm_names, prepare_cohort, prepare_sites
    from export.models import Teacher

    spec = FederationSpec(sites=2, rounds=1, cases_per_site=12, val_per_site=8)
    cohort, pre = prepare_cohort(CFG, spec, seed=0)
    sites = prepare_sites(cohort, pre, spec, tmp_path / "cases")
    states = {}
    for local in (True, False):
        torch.manual_seed(0)
        model = Teacher(CFG.model, CFG.input.n_genes, 2)
        fed = Federation(model, sites, FederationSpec(**{**spec.__dict__, "local_norm": local}), CFG.train, 0,
                         tmp_path / str(local), lambda _: None)
        fed.run()
        states[local] = (fed, {k: v.clone() for k, v in model.state_dict().items()})
    fed, global_state = states[True]
    names = norm_names(fed.model)
    mean_name = next(n for n in names if n.endswith("running_mean"))
    weight_name = next(n for n in names if n.endswith(".weight"))
    own = fed.site_norms
    assert set(own) == {0, 1}
    assert not torch.equal(own[0][mean_name], own[1][mean_name]), "sites with other scanners keep other statistics"
    assert not torch.equal(own[0][weight_name], own[1][weight_name]), "affine norm weights are local too"
    expected = (own[0][weight_name] + own[1][weight_name]) / 2  # equal site sizes: the plain mean
    assert torch.allclose(global_state[weight_name], expected, atol=1e-6)
    shared_fed, _ = states[False]
    assert shared_fed.site_norms == {}
    params = dict.fromkeys(n for n, _ in fed.model.named_parameters())
    assert not names & set(fed._shared(params)), "FedBN: no norm parameter is sent to the server"
    assert names & set(shared_fed._shared(params)), "--shared-norm: norm parameters are averaged"


def test_centralized_and_local_baselines(tmp_path):
    from export.federated import run_baseline

    for name in ("centralized", "local"):
        spec = FederationSpec(sites=2, rounds=1, strategy=name, cases_per_site=8, val_per_site=6, test_per_site=6)
        result = run_baseline(tmp_path / name, CFG, spec, seed=0, log=lambda _: None)
        assert set(result["test_auc"]) == {"site0", "site1"}
        assert all(0.0 <= v <= 1.0 or np.isnan(v) for v in result["test_auc"].values())
    assert (tmp_path / "centralized" / "federated.pt").is_file()
    assert {p.name for p in (tmp_path / "local").glob("local_site*.pt")} == {"local_site0.pt", "local_site1.pt"}
    with pytest.raises(BadInput, match="unknown baseline"):
        run_baseline(tmp_path / "x", CFG, FederationSpec(sites=1, rounds=1), log=lambda _: None)


def test_auxiliary_risk_task_trains_only_when_weighted():
    import torch

    from edge_runtime.preprocess import Preprocessing
    from edge_runtime.synthetic import SynthConfig, SyntheticCohort
    from export.data import collate
    from export.models import Teacher
    from export.stats import fit_preprocessing
    from export.train import teacher_loss

    cohort = SyntheticCohort(SynthConfig(seed=0, spec=CFG.input))
    cases = list(cohort.iter_cases(0, 6))
    assert all(c.risk is not None and np.isfinite(c.risk) for c in cases)
    pre: Preprocessing = fit_preprocessing(iter(cases), CFG.input)
    batch = collate(cases, pre)
    batch.risk[0] = float("nan")  # an unknown target is skipped, not a NaN loss
    for weight, expect_grad in ((0.5, True), (0.0, False)):
        torch.manual_seed(0)
        model = Teacher(CFG.model, CFG.input.n_genes, 2)
        loss = teacher_loss(model, batch, batch.mask, CFG.train.__class__(**{**CFG.train.__dict__, "aux_weight": weight}))
        loss.backward()
        assert torch.isfinite(loss)
        grad = model.risk_head.weight.grad
        assert (grad is not None and float(grad.abs().sum()) > 0) == expect_grad


def test_short_federated_run_on_tiny_beats_chance(tmp_path):
    """Two sites, three rounds of DW-FL on the tiny config (about 20 s on 2 cores)."""
    from export.config import TINY

    spec = FederationSpec(sites=2, rounds=3, cases_per_site=48, val_per_site=24, test_per_site=40)
    result = run_federation(tmp_path, TINY, spec, seed=0, log=lambda _: None)
    test_auc = np.array(list(result["test_auc"].values()))
    assert test_auc.mean() > 0.65 and test_auc.min() > 0.6, result["test_auc"]
    first, last = result["rounds"][0]["val_auc"], result["rounds"][-1]["val_auc"]
    assert np.mean(list(last.values())) > np.mean(list(first.values())), "validation AUC rises over the rounds"


def test_pipeline_teacher_is_trained_federated(tmp_path):
    from export.pipeline import run_pipeline

    logs: list[str] = []
    run_pipeline(tmp_path / "out", MICRO.with_train(teacher_epochs=2, student_epochs=1), seed=0, log=logs.append)
    assert any(line.startswith("teacher: federated over 4 sites") for line in logs), logs[:3]
    assert sum(line.startswith("round ") for line in logs) == 2


def test_fedprox_proximal_term_changes_the_client_update(tmp_path):
    """FedProx's mu reaches the sites through strategy.client_config(): the same round with a strong
    proximal term moves each site's weights less from the global model."""
    norms = {}
    for mu in (0.0, 100.0):
        spec = FederationSpec(sites=2, rounds=1, strategy="fedprox", mu=mu, local_epochs=3, cases_per_site=12, val_per_site=8)
        (record,) = run_federation(tmp_path / str(mu), CFG, spec, seed=1, log=lambda _: None)["rounds"]
        norms[mu] = record["norms"]
    assert set(norms[0.0]) == set(norms[100.0]) == {"site0", "site1"}
    for site in norms[0.0]:
        assert norms[100.0][site] < 0.8 * norms[0.0][site], norms


@pytest.mark.parametrize("strategy", ["fedavgm", "dwfl_mw", "fedyogi"])
def test_strategy_state_survives_a_resumed_run(tmp_path, strategy):
    """The checkpoint keeps the strategy's server state (FedAvgM's velocity, dwfl_mw's per-site lambda,
    FedYogi's moments, via state_dict): a federation resumed from it (a new process) starts with the
    state the first one ended with; resuming with another strategy is refused."""
    import torch

    from export.federated import Federation, prepare_cohort, prepare_sites
    from export.models import Teacher

    spec = FederationSpec(sites=2, rounds=1, strategy=strategy, cases_per_site=8, val_per_site=6)
    cohort, pre = prepare_cohort(CFG, spec, seed=0)
    sites = prepare_sites(cohort, pre, spec, tmp_path / "cases")

    def federation() -> Federation:
        torch.manual_seed(0)
        return Federation(Teacher(CFG.model, CFG.input.n_genes, 2), sites, spec, CFG.train, 0, tmp_path / "fl", lambda _: None)

    first = federation()
    first.run()
    ended = first.strategy.state_dict()
    assert ended
    if strategy == "fedavgm":
        assert all(k.startswith("velocity/") for k in ended) and any(np.any(v != 0) for v in ended.values())
    resumed = federation()
    resumed.run(resume=True)  # all rounds done: restores, trains nothing
    restored = resumed.strategy.state_dict()
    assert set(restored) == set(ended) and all(np.array_equal(restored[k], ended[k]) for k in ended)
    with pytest.raises(BadInput, match="resume with the same strategy"):
        run_federation(tmp_path / "fl", CFG, FederationSpec(sites=2, rounds=2, strategy="fedavg", cases_per_site=8,
                                                            val_per_site=6), seed=0, resume=True, log=lambda _: None)


def test_registry_makes_every_strategy_with_its_options():
    from export.cli import parse_strategy_options
    from export.federated import make_strategy
    from federation.aggregation import STRATEGIES

    for name in STRATEGIES:
        assert make_strategy(FederationSpec(sites=2, rounds=1, strategy=name)).name == name
    mw = make_strategy(FederationSpec(sites=2, rounds=1, strategy="dwfl_mw", beta=0.5,
                                      strategy_options=parse_strategy_options(("eta=1.5", "cap=2"))))
    assert (mw.beta, mw.eta, mw.cap) == (0.5, 1.5, 2.0)
    with pytest.raises(BadInput, match="has no setting eta"):
        make_strategy(FederationSpec(sites=2, rounds=1, strategy="fedadam", strategy_options=(("eta", 1.0),)))
    with pytest.raises(BadInput, match="KEY=NUMBER"):
        parse_strategy_options(("eta",))
    with pytest.raises(BadInput, match="eta"):
        make_strategy(FederationSpec(sites=2, rounds=1, strategy="dwfl_mw", strategy_options=(("eta", -1.0),)))
