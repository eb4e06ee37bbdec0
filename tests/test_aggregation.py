"""DW-FL and baselines: the formula of DESIGN §4 checked by hand, the one-load-per-update,
rejection, clipping and branch rules, and the strategies' interface (constructors, client
configuration, server state)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime import MODALITIES
from edge_runtime.errors import BadInput
from federation.aggregation import (
    DWFL,
    ClientUpdate,
    FedAvg,
    FedAvgM,
    FedProx,
    UpdateMeta,
    cap_weights,
    clip_bound,
    data_shares,
    dwfl_weights,
    dynamic_shares,
    l2_norm,
    staleness_discount,
    unpublishable,
)

GLOBAL = {"enc.ct.w": np.zeros((2, 2), np.float32), "head.w": np.zeros(3, np.float32)}


def branch_of(name: str):
    return "ct" if name.startswith("enc.ct") else None


def delta_of(value):
    return {"enc.ct.w": np.full((2, 2), value, np.float32), "head.w": np.full(3, value, np.float32)}


def update(client, n, loss, value, staleness=0, r_ct=1.0, delta=None, **meta):
    return ClientUpdate.in_memory(UpdateMeta(client, n, loss, {"ct": r_ct}, staleness, **meta),
                                  delta_of(value) if delta is None else delta)


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
    result = DWFL(clip_factor=0).aggregate(GLOBAL, ups, branch_of)
    w = dwfl_weights(np.array([100, 300]), np.array([0.2, 0.9]), np.zeros(2))
    assert np.allclose(result.params["head.w"], w[0] * 1.0 + w[1] * 3.0)
    assert result.accepted == ["a", "b"] and result.rejected == []
    assert result.weights["shared"]["a"] == pytest.approx(w[0], abs=1e-6)


def test_modality_branch_uses_n_times_fraction():
    # Client b has no CT: it must not move the CT branch, but it does move the shared head.
    ups = [update("a", 100, 0.5, 1.0, r_ct=1.0), update("b", 100, 0.5, 5.0, r_ct=0.0)]
    result = FedAvg(clip_factor=0).aggregate(GLOBAL, ups, branch_of)
    assert np.allclose(result.params["enc.ct.w"], 1.0)
    assert np.allclose(result.params["head.w"], 3.0)
    assert result.weights["ct"] == {"a": 1.0, "b": 0.0}


def test_bad_updates_rejected_not_averaged():
    shape, nan, missing = delta_of(1.0), delta_of(1.0), delta_of(1.0)
    shape["head.w"] = np.zeros(4, np.float32)
    nan["enc.ct.w"][0, 0] = np.nan
    del missing["head.w"]
    ups = [update("good", 100, 0.5, 2.0), update("shape", 100, 0.5, 0, delta=shape), update("nan", 100, 0.5, 0, delta=nan),
           update("missing", 100, 0.5, 0, delta=missing), update("empty", 0, 0.5, 9.0), update("good", 100, 0.5, 2.0)]
    result = DWFL(clip_factor=0).aggregate(GLOBAL, ups, branch_of)
    assert result.accepted == ["good"]
    reasons = dict(result.rejected)
    assert "shape" in reasons["shape"] and "non-finite" in reasons["nan"] and "missing" in reasons["missing"]
    assert "n <= 0" in reasons["empty"] and "same client" in reasons["good"]
    assert np.allclose(result.params["head.w"], 2.0), "the replayed update counted once"


def test_robust_clipping_bounds_an_outlier():
    ups = [update(f"c{i}", 100, 0.5, 1.0) for i in range(4)] + [update("huge", 100, 0.5, 1000.0)]
    result = FedAvg().aggregate(GLOBAL, ups, branch_of)
    norm_one = np.sqrt(7.0)
    assert result.clip_bound == pytest.approx(3 * norm_one, rel=1e-6)
    # huge is scaled to norm 3*sqrt(7): each of its entries becomes 3.
    assert np.allclose(result.params["head.w"], (4 * 1.0 + 3.0) / 5, atol=1e-5)
    unclipped = FedAvg(clip_factor=0).aggregate(GLOBAL, ups, branch_of)
    assert unclipped.params["head.w"][0] > 100


def test_staleness_discounts():
    ups = [update("fresh", 100, 0.5, 1.0, staleness=0), update("stale", 100, 0.5, 3.0, staleness=3)]
    result = FedAvg(clip_factor=0).aggregate(GLOBAL, ups, branch_of)
    assert result.weights["shared"]["fresh"] == pytest.approx(2 / 3, abs=1e-6)


def test_inverse_variance_option():
    ups = [update("quiet", 100, 0.5, 1.0, noise_multiplier=0.0), update("noisy", 100, 0.5, 3.0, noise_multiplier=2.0)]
    off = FedAvg(clip_factor=0).aggregate(GLOBAL, ups, branch_of)
    on = FedAvg(clip_factor=0, inverse_variance=True).aggregate(GLOBAL, ups, branch_of)
    assert off.weights["shared"]["noisy"] == pytest.approx(0.5)
    assert on.weights["shared"]["noisy"] == pytest.approx(1 / 6, abs=1e-6)  # 0.5/(1+4) against 0.5/1


def test_fedavgm_momentum_accumulates_and_fedprox_is_fedavg_on_the_server():
    strategy = FedAvgM(momentum=0.5, clip_factor=0)
    params = GLOBAL
    for _ in range(2):
        params = strategy.aggregate(params, [update("a", 1, 0.1, 1.0)], branch_of).params
    assert np.allclose(params["head.w"], 1.0 + 1.5)
    prox = FedProx(mu=0.1, clip_factor=0).aggregate(GLOBAL, [update("a", 1, 0.1, 2.0)], branch_of)
    assert np.allclose(prox.params["head.w"], 2.0)


def test_each_update_is_loaded_once():
    loads = []

    def loader(i):
        def load():
            loads.append(i)
            return delta_of(float(i))
        return load

    ups = [ClientUpdate(UpdateMeta(f"c{i}", 10 + i, 0.5), l2_norm(delta_of(float(i))), loader(i)) for i in range(3)]
    DWFL().aggregate(GLOBAL, ups, branch_of)
    assert loads == [0, 1, 2], "weights and clip bound come from what is known upfront; one load each"


def test_update_that_cannot_be_loaded_is_rejected_and_the_rest_aggregate_without_it():
    def broken():
        raise OSError("blob 0123… is corrupt")

    good = [update("a", 100, 0.2, 1.0), update("b", 300, 0.9, 3.0)]
    ups = [good[0], ClientUpdate(UpdateMeta("bad", 500, 1.5), 1.0, broken), good[1]]
    result = DWFL(clip_factor=0).aggregate(GLOBAL, ups, branch_of)
    alone = DWFL(clip_factor=0).aggregate(GLOBAL, good, branch_of)
    assert result.accepted == ["a", "b"] and result.rejected == [("bad", "cannot be opened: blob 0123… is corrupt")]
    assert result.weights == alone.weights and np.allclose(result.params["head.w"], alone.params["head.w"])


def test_all_rejected_leaves_the_model_unchanged():
    inf = delta_of(1.0)
    inf["head.w"][:] = np.inf
    result = DWFL().aggregate(GLOBAL, [update("nan", 100, 0.5, 0, delta=inf)], branch_of)
    assert result.accepted == [] and all(np.array_equal(result.params[k], GLOBAL[k]) for k in GLOBAL)


def test_permutation_invariance():
    rng = np.random.default_rng(0)
    ups = [update(f"c{i}", int(rng.integers(10, 200)), float(rng.uniform(0.1, 1.5)), float(rng.normal()),
                  staleness=int(rng.integers(0, 3)), r_ct=float(rng.uniform())) for i in range(6)]
    a = DWFL().aggregate(GLOBAL, ups, branch_of)
    b = DWFL().aggregate(GLOBAL, ups[::-1], branch_of)
    for k in GLOBAL:
        assert np.allclose(a.params[k], b.params[k], atol=1e-6)
    for branch in ("shared", "ct"):
        assert sum(a.weights[branch].values()) == pytest.approx(1.0, abs=1e-5)
    assert sum(a.weights["genomics"].values()) == 0.0, "no client reported genomics: that branch does not move"


def test_streaming_memory_does_not_grow_with_the_number_of_updates():
    import tracemalloc

    big = {"w": np.zeros((256, 256), np.float32)}  # 256 KB per update

    def source(n):  # each delta made when it is loaded, as the server opens a stored one
        return [ClientUpdate(UpdateMeta(f"c{i}", 10, 0.5), 256.0 * (i % 7), lambda i=i: {"w": np.full((256, 256), i % 7, np.float32)})
                for i in range(n)]

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


def test_strategies_take_keyword_only_range_checked_settings():
    with pytest.raises(TypeError):
        DWFL(0.3)  # noqa: keyword-only
    for make, words in [(lambda: DWFL(beta=1.5), "beta = 1.5"), (lambda: DWFL(temperature=0), "temperature"),
                        (lambda: DWFL(dynamic="other"), "dynamic"), (lambda: FedProx(mu=-0.1), "mu"),
                        (lambda: FedAvgM(momentum=1.0), "momentum"), (lambda: FedAvg(clip_factor=-1), "clip_factor"),
                        (lambda: FedAvg(server_lr=0), "server_lr")]:
        with pytest.raises(BadInput, match=words):
            make()


def test_client_config_hands_fedprox_mu_to_the_clients():
    assert FedProx(mu=0.25).client_config().proximal_mu == 0.25
    assert DWFL().client_config().proximal_mu == FedAvg().client_config().proximal_mu == FedAvgM().client_config().proximal_mu == 0.0


def test_fedavgm_velocity_survives_a_restart():
    """The server state of FedAvgM (its velocity) through state_dict / load_state_dict: a strategy
    rebuilt between rounds (a restarted server) takes the same second step as one that kept running."""
    rounds = [[update("a", 1, 0.1, 1.0)], [update("a", 1, 0.1, -0.5)]]
    kept = FedAvgM(momentum=0.5, clip_factor=0)
    params = GLOBAL
    for ups in rounds:
        params = kept.aggregate(params, ups, branch_of).params
    first = FedAvgM(momentum=0.5, clip_factor=0)
    mid = first.aggregate(GLOBAL, rounds[0], branch_of).params
    state = {k: v.copy() for k, v in first.state_dict().items()}
    assert set(state) == {f"velocity/{k}" for k in GLOBAL}
    restarted = FedAvgM(momentum=0.5, clip_factor=0)
    restarted.load_state_dict(state)
    again = restarted.aggregate(mid, rounds[1], branch_of).params
    assert np.allclose(again["head.w"], params["head.w"]) and np.allclose(params["head.w"], 1.0 + (0.5 - 0.5))
    fresh = FedAvgM(momentum=0.5, clip_factor=0).aggregate(mid, rounds[1], branch_of).params
    assert not np.allclose(fresh["head.w"], params["head.w"]), "without its velocity the step differs"
    with pytest.raises(BadInput, match="keeps no server state"):
        DWFL().load_state_dict(state)


def test_branches_are_the_runtime_modalities():
    result = DWFL().aggregate(GLOBAL, [update("a", 10, 0.5, 1.0)], branch_of)
    assert set(result.weights) == {"shared", *MODALITIES}


# ---------------------------------------------------------------- one client's influence (issue 14, item 3)


def test_weight_cap_water_fills_and_shortens_the_step_when_too_few_clients():
    w = cap_weights(np.array([0.9, 0.06, 0.04]), 0.5)
    assert w == pytest.approx([0.5, 0.3, 0.2]) and w.sum() == pytest.approx(1.0)
    w = cap_weights(np.array([0.7, 0.2, 0.05, 0.05]), 0.3)  # the excess shared in proportion, re-capped
    assert w.max() <= 0.3 + 1e-12 and w.sum() == pytest.approx(1.0) and w[0] == pytest.approx(0.3) and w[1] == pytest.approx(0.3)
    assert cap_weights(np.array([0.8, 0.2]), 0.4) == pytest.approx([0.4, 0.4])  # 2 x 0.4 < 1: the step is shortened
    assert cap_weights(np.array([1.0, 0.0]), 0.5) == pytest.approx([0.5, 0.0])  # no data for the branch: stays 0
    assert cap_weights(np.array([0.9, 0.1]), 1.0) == pytest.approx([0.9, 0.1])


def test_fixed_clip_ceiling_is_not_moved_by_a_large_update():
    assert clip_bound([1.0, 1.2, 1e30], 3.0) == pytest.approx(3.6)
    assert clip_bound([1.0, 1e30], 3.0) == pytest.approx(3.0)  # two updates: the lower median, never the attacker's half
    assert clip_bound([2.0, 1.0, 7.0, 1e30], 3.0) == pytest.approx(6.0)
    assert clip_bound([10.0, 1e30], 3.0, max_clip=5.0) == 5.0
    assert clip_bound([1.0, 1.0], 3.0, max_clip=5.0) == 3.0 and clip_bound([1.0], 0.0, max_clip=5.0) == 5.0


def test_attacker_within_every_arrival_bound_moves_the_head_at_most_weight_cap_times_clip():
    """Regression (issue 14): one client claiming the largest n and the worst fit, with a delta as
    large as the arrival bounds allow, moved the global model as far as it liked (the clip bound was
    3 x median of 2-3 norms and its weight was its claimed data share). Now its own term of the sum
    is at most c * C_max, whatever it sends: compared with the same round where it sends nothing."""
    cap, c_max = 0.5, 2.0
    honest = [update("a", 48, 0.6, 0.01), update("b", 60, 0.7, -0.02)]

    def attacker(value):
        return update("evil", 100_000, 3.0, value, noise_multiplier=0.5)

    # a fixed C (clip_factor 0): the weights depend on what is claimed, not on the delta
    strategy = DWFL(clip_factor=0.0, max_clip=c_max, max_weight=cap)
    quiet = strategy.aggregate(GLOBAL, [*honest, attacker(0.0)], branch_of)
    loud = strategy.aggregate(GLOBAL, [*honest, attacker(100.0)], branch_of)
    move = l2_norm({k: loud.params[k].astype(np.float64) - quiet.params[k] for k in GLOBAL})
    assert move <= cap * c_max * (1 + 1e-6) and move > 0.9 * cap * c_max, move
    assert max(w["evil"] for w in loud.weights.values()) <= cap + 1e-6
    # the adaptive bound capped by C_max: the whole step is within C_max, the attacker's weight within the cap
    robust = DWFL(max_clip=c_max, max_weight=cap).aggregate(GLOBAL, [*honest, attacker(100.0)], branch_of)
    assert robust.clip_bound <= c_max and l2_norm(robust.params) <= c_max * (1 + 1e-6)
    # without clip and cap the same attacker takes the model wherever it likes
    plain = DWFL(clip_factor=0.0).aggregate(GLOBAL, [honest[0], attacker(100.0)], branch_of)
    assert l2_norm(plain.params) > 100 * cap * c_max


def test_influence_settings_are_range_checked():
    for kwargs in ({"max_weight": 0.0}, {"max_weight": 1.5}, {"max_clip": -1.0}, {"max_clip": float("nan")}):
        with pytest.raises(BadInput, match=next(iter(kwargs))):
            DWFL(**kwargs)


def test_unpublishable_names_the_parameter():
    ok = {"w": np.ones(3, np.float32)}
    assert unpublishable(ok, 10.0) is None
    assert unpublishable({"w": np.array([1.0, np.nan])}, 10.0) == "w: non-finite values"
    assert "exceeds the bound 10" in unpublishable({**ok, "v": np.array([1e30], np.float32)}, 10.0)
