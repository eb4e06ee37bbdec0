"""The paired benchmark's own pieces: the generator's draws replayed without rendering, the
pre-registered sites, the paired statistics."""

from __future__ import annotations

import numpy as np

from benchmarks import federation_noniid as B
from edge_runtime.synthetic import InputSpec, observed_oracle

SMALL = InputSpec(ct_grid=(4, 16, 16), tile=16, n_genes=32)


def test_latent_draws_are_the_generators_own():
    cohort = B.cohort_for(3, SMALL)
    for site in range(B.N_SITES):
        for index in (site * B.SITE_STRIDE + i for i in range(0, 40, 7)):
            case = cohort.case(index, site=site)
            drawn_site, label, latent, _, present = cohort.draws(index, site)
            assert drawn_site == site
            assert (label, latent) == (case.label, case.risk)
            assert tuple(m for m, p in zip(("ct", "pathology", "genomics"), present) if p) == case.modalities
    for index in range(20):  # unpinned (seed_protocol's cases): the site is drawn first, on the same stream
        case, (site, label, latent, _, _) = cohort.case(index), cohort.draws(index)
        assert (site, label, latent) == (case.site, case.label, case.risk)


def test_pre_registered_sites():
    cohort = B.cohort_for(0, SMALL)
    assert len(cohort.sites) == B.N_SITES == len(B.TRAIN_CASES) >= 6
    assert cohort.sites[5].prevalence == 0.9 and min(B.TRAIN_CASES) < max(B.TRAIN_CASES) / 2
    assert min(B.TEST_CASES.values()) >= 500
    sites = B.build_sites(0, "fast")
    assert [len(s["train"].y) for s in sites] == list(B.TRAIN_CASES)
    assert all(len(s["test"].y) == B.TEST_CASES["fast"] for s in sites)
    again = B.build_sites(0, "fast")  # paired: the same cases, bit for bit, for every strategy
    assert all(np.array_equal(a["test"].emb, b["test"].emb) for a, b in zip(sites, again))
    assert all(np.all(s["test"].emb[s["test"].mask == 0] == 0) for s in sites), "a missing modality embeds as zeros"


def test_paired_interval_by_hand():
    p = B.paired_interval(np.array([0.01, 0.03, 0.02, 0.04]), np.random.default_rng(0))
    assert p["mean"] == 0.025 and p["wins"] == 4 and p["losses"] == 0
    assert p["boot95"][0] >= 0.01 and p["boot95"][1] <= 0.04
    # paired t: mean 0.025, sd 0.0129, se 0.00645, t(3) = 3.182
    assert abs(p["t95"][0] - (0.025 - 3.182 * 0.012910 / 2)) < 1e-3


def test_one_seed_runs_every_strategy_and_weights_sum_to_one():
    sites = B.build_sites(7, "fast")
    for name in ("fedavg", "dwfl_mw", "qfedavg"):
        r = B.run_fast(name, sites, 7, "fast")
        assert len(r["test_auc"]) == B.N_SITES and all(0.0 <= a <= 1.0 for a in r["test_auc"])
        assert len(r["weights"]) == B.ROUNDS["fast"] and all(abs(sum(w) - 1) < 1e-4 for w in r["weights"])


def test_observed_oracle_is_the_likelihood_ratio_by_hand():
    # two modalities present, f = (1.0, 0.5): 2 * 0.7 * 1.5 / (1 + 2 * 0.16)
    score = observed_oracle(np.array([1.0, 9.0, 0.5]), np.array([True, False, True]))
    assert abs(score - 2 * 0.7 * 1.5 / 1.32) < 1e-12
