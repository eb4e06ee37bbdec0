"""DW-FL and baselines: the formula of DESIGN §4 checked by hand, and the streaming, rejection,
clipping and branch rules."""

from __future__ import annotations

import numpy as np
import pytest

from federation.aggregation import (
    DWFL,
    ClientUpdate,
    FedAvg,
    FedAvgM,
    FedProx,
    UpdateMeta,
    data_shares,
    dwfl_weights,
    dynamic_shares,
    from_list,
    staleness_discount,
)

GLOBAL = {"enc.ct.w": np.zeros((2, 2), np.float32), "head.w": np.zeros(3, np.float32)}


def branch_of(name: str):
    return "ct" if name.startswith("enc.ct") else None


def update(client, n, loss, value, staleness=0, r_ct=1.0, **meta):
    delta = {"enc.ct.w": np.full((2, 2), value, np.float32), "head.w": np.full(3, value, np.float32)}
    return ClientUpdate(UpdateMeta(client, n, loss, {"ct": r_ct}, staleness, **meta), delta)


def test_weight_formula_by_hand():
    n, losses, tau = np.array([100, 300]), np.array([0.2, 0.9]), np.array([0, 3])
    a = n / 400
    d = np.exp(losses) / np.exp(losses).sum()
    raw = (0.7 * a + 0.3 * d) * np.array([1.0, 0.5])
    assert np.allclose(dwfl_weights(n, losses, tau, beta=0.3, temperature=1.0), raw / raw.sum())
    assert np.allclose(data_shares(n), a) and np.allclose(dynamic_shares(losses), d)
    assert np.allclose(staleness_discount([0, 3, 8]), [1.0, 0.5, 1 / 3])


def test_higher_loss_weighs_more_and_beta_zero_is_fedavg():
    n, losses, tau = np.array([100, 100]), np.array([0.1, 1.5]), np.zeros(2)
    w = dwfl_weights(n, losses, tau, beta=0.3)
    assert w[1] > w[0]
    assert np.allclose(dwfl_weights(n, losses, tau, beta=0.0), [0.5, 0.5])


def test_temperature_flattens_the_dynamic_term():
    n, losses, tau = np.array([100, 100]), np.array([0.1, 1.5]), np.zeros(2)
    assert dwfl_weights(n, losses, tau, 0.3, temperature=10.0)[1] < dwfl_weights(n, losses, tau, 0.3, temperature=1.0)[1]


def test_aggregate_matches_manual_weighted_mean():
    ups = [update("a", 100, 0.2, 1.0), update("b", 300, 0.9, 3.0)]
    result = DWFL(clip_factor=0).aggregate(GLOBAL, from_list(ups), branch_of)
    w = dwfl_weights(np.array([100, 300]), np.array([0.2, 0.9]), np.zeros(2))
    assert np.allclose(result.params["head.w"], w[0] * 1.0 + w[1] * 3.0)
    assert result.accepted == ["a", "b"] and result.rejected == []
    assert result.weights["shared"]["a"] == pytest.approx(w[0], abs=1e-6)


def test_modality_branch_uses_n_times_fraction():
    # Client b has no CT: it must not move the CT branch, but it does move the shared head.
    ups = [update("a", 100, 0.5, 1.0, r_ct=1.0), update("b", 100, 0.5, 5.0, r_ct=0.0)]
    result = FedAvg(clip_factor=0).aggregate(GLOBAL, from_list(ups), branch_of)
    assert np.allclose(result.params["enc.ct.w"], 1.0)
    assert np.allclose(result.params["head.w"], 3.0)
    assert result.weights["ct"] == {"a": 1.0, "b": 0.0}


def test_bad_updates_rejected_not_averaged():
    bad_shape = update("shape", 100, 0.5, 1.0)
    bad_shape.delta["head.w"] = np.zeros(4, np.float32)
    nan = update("nan", 100, 0.5, 1.0)
    nan.delta["enc.ct.w"][0, 0] = np.nan
    missing = update("missing", 100, 0.5, 1.0)
    del missing.delta["head.w"]
    ups = [update("good", 100, 0.5, 2.0), bad_shape, nan, missing, update("empty", 0, 0.5, 9.0), update("good", 100, 0.5, 2.0)]
    result = DWFL(clip_factor=0).aggregate(GLOBAL, from_list(ups), branch_of)
    assert result.accepted == ["good"]
    reasons = dict(result.rejected)
    assert "shape" in reasons["shape"] and "non-finite" in reasons["nan"] and "missing" in reasons["missing"]
    assert "n <= 0" in reasons["empty"] and "same client" in reasons["good"]
    assert np.allclose(result.params["head.w"], 2.0), "the replayed update counted once"


def test_robust_clipping_bounds_an_outlier():
    ups = [update(f"c{i}", 100, 0.5, 1.0) for i in range(4)] + [update("huge", 100, 0.5, 1000.0)]
    result = FedAvg().aggregate(GLOBAL, from_list(ups), branch_of)
    norm_one = np.sqrt(7.0)
    assert result.clip_bound == pytest.approx(3 * norm_one, rel=1e-6)
    # huge is scaled to norm 3*sqrt(7): each of its entries becomes 3.
    assert np.allclose(result.params["head.w"], (4 * 1.0 + 3.0) / 5, atol=1e-5)
    unclipped = FedAvg(clip_factor=0).aggregate(GLOBAL, from_list(ups), branch_of)
    assert unclipped.params["head.w"][0] > 100


def test_staleness_discounts():
    ups = [update("fresh", 100, 0.5, 1.0, staleness=0), update("stale", 100, 0.5, 3.0, staleness=3)]
    result = FedAvg(clip_factor=0).aggregate(GLOBAL, from_list(ups), branch_of)
    assert result.weights["shared"]["fresh"] == pytest.approx(2 / 3, abs=1e-6)


def test_inverse_variance_option():
    ups = [update("quiet", 100, 0.5, 1.0, noise_multiplier=0.0), update("noisy", 100, 0.5, 3.0, noise_multiplier=2.0)]
    off = FedAvg(clip_factor=0).aggregate(GLOBAL, from_list(ups), branch_of)
    on = FedAvg(clip_factor=0, inverse_variance=True).aggregate(GLOBAL, from_list(ups), branch_of)
    assert off.weights["shared"]["noisy"] == pytest.approx(0.5)
    assert on.weights["shared"]["noisy"] == pytest.approx(1 / 6, abs=1e-6)  # 0.5/(1+4) against 0.5/1


def test_fedavgm_momentum_accumulates_and_fedprox_is_fedavg_on_the_server():
    strategy = FedAvgM(momentum=0.5, clip_factor=0)
    params = GLOBAL
    for _ in range(2):
        params = strategy.aggregate(params, from_list([update("a", 1, 0.1, 1.0)]), branch_of).params
    assert np.allclose(params["head.w"], 1.0 + 1.5)
    prox = FedProx(mu=0.1, clip_factor=0).aggregate(GLOBAL, from_list([update("a", 1, 0.1, 2.0)]), branch_of)
    assert np.allclose(prox.params["head.w"], 2.0)


def test_streaming_source_is_read_twice_one_update_at_a_time():
    reads = []

    def source():
        for i in range(3):
            reads.append(i)
            yield update(f"c{i}", 10 + i, 0.5, float(i))

    DWFL().aggregate(GLOBAL, source, branch_of)
    assert reads == [0, 1, 2, 0, 1, 2]


def test_all_rejected_leaves_the_model_unchanged():
    nan = update("nan", 100, 0.5, 1.0)
    nan.delta["head.w"][:] = np.inf
    result = DWFL().aggregate(GLOBAL, from_list([nan]), branch_of)
    assert result.accepted == [] and all(np.array_equal(result.params[k], GLOBAL[k]) for k in GLOBAL)


def test_permutation_invariance():
    rng = np.random.default_rng(0)
    ups = [update(f"c{i}", int(rng.integers(10, 200)), float(rng.uniform(0.1, 1.5)), float(rng.normal()),
                  staleness=int(rng.integers(0, 3)), r_ct=float(rng.uniform())) for i in range(6)]
    a = DWFL().aggregate(GLOBAL, from_list(ups), branch_of)
    b = DWFL().aggregate(GLOBAL, from_list(ups[::-1]), branch_of)
    for k in GLOBAL:
        assert np.allclose(a.params[k], b.params[k], atol=1e-6)
    for branch in ("shared", "ct"):
        assert sum(a.weights[branch].values()) == pytest.approx(1.0, abs=1e-5)
    assert sum(a.weights["genomics"].values()) == 0.0, "no client reported genomics: that branch does not move"


def test_streaming_memory_does_not_grow_with_the_number_of_updates():
    import tracemalloc

    big = {"w": np.zeros((256, 256), np.float32)}  # 256 KB per update

    def source(n):
        def gen():
            for i in range(n):
                delta = {"w": np.full((256, 256), i % 7, np.float32)}
                yield ClientUpdate(UpdateMeta(f"c{i}", 10, 0.5), delta)
        return gen

    peaks = []
    for n in (20, 400):
        tracemalloc.start()
        DWFL().aggregate(big, source(n))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < peaks[0] * 1.5, f"peak grew from {peaks[0]} to {peaks[1]} bytes"
    assert peaks[1] < 20 * 256 * 256 * 4, "far below holding 20 updates at once"


def test_relative_dynamic_term_is_scale_free():
    from federation.aggregation import dynamic_shares

    losses = np.array([0.2, 0.4, 0.6])
    rel = dynamic_shares(losses, 0.5, "relative")
    assert np.allclose(rel, dynamic_shares(losses * 10, 0.5, "relative"))
    assert np.allclose(rel, dynamic_shares(losses / 0.4, 0.5, "loss"))  # L / (T * mean L)
    assert not np.allclose(dynamic_shares(losses, 0.5), dynamic_shares(losses * 10, 0.5))
    with pytest.raises(ValueError, match="unknown dynamic term"):
        dynamic_shares(losses, 1.0, "other")
