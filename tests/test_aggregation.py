"""DW-FL and baselines: the formula of DESIGN §4 checked by hand, the one-load-per-update,
rejection, clipping and branch rules, and the strategies' interface (constructors, client
configuration, server state)."""

from __future__ import annotations

import itertools

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
# ---------------------------------------------------------------- issue 15: dynamic weights with memory, baselines

from federation.aggregation import (
    STRATEGIES,
    DWFLMemory,
    DWFLPower,
    FedAdam,
    FedYogi,
    QFedAvg,
    capped_simplex,
    mixed_weights,
    mw_shares,
    power_shares,
    qffl_step_scale,
    qffl_weights,
    relative_losses,
)

MW = {"eta": 2.0, "smoothing": 0.1, "floor": 0.25, "cap": 3.0}


def test_mw_shares_by_hand():
    prior, losses = np.array([1.0, 1.0, 2.0]), np.array([0.4, 0.6, 0.8])  # mean 0.6: r - 1 = (-1/3, 0, 1/3)
    x = prior / 4 * np.exp(2.0 * np.array([-1 / 3, 0.0, 1 / 3]))
    x = 0.9 * x / x.sum() + 0.1 / 3
    assert np.all((x >= 0.25 / 3) & (x <= 1.0)), "no cap binds in this case"
    assert np.allclose(mw_shares(prior, losses, **MW), x)


def test_capped_simplex_by_hand_and_caps_bind():
    # [0.1, 0.2, 0.7] with caps [0.2, 0.5]: 0.7 -> 0.5, 0.1 -> 0.2, the middle takes the rest (0.3) = t v with t = 1.5.
    assert np.allclose(capped_simplex(np.array([0.1, 0.2, 0.7]), 0.2, 0.5), [0.2, 0.3, 0.5])
    assert np.allclose(capped_simplex(np.array([1.0, 1.0]), 0.0, 1.0), [0.5, 0.5])
    assert np.allclose(capped_simplex(np.array([1.0, 0.0, 0.0]), 0.1, 0.5), [0.5, 0.25, 0.25]), "zeros share what the cap leaves"
    with pytest.raises(ValueError, match="cannot hold"):
        capped_simplex(np.ones(3), 0.5, 1.0)


def test_power_shares_by_hand_and_q_zero_is_uniform():
    r = np.array([0.5, 1.0, 1.5])
    raw = r ** 2 / np.sum(r ** 2)  # [0.0714, 0.2857, 0.6429]
    assert np.allclose(power_shares(r, q=2.0, floor=0.0, cap=3.0), raw)
    assert np.allclose(power_shares(r, q=0.0, floor=0.25, cap=3.0), 1 / 3)
    # caps [1/12, 1/2]: 0.6429 -> 0.5, the other two scaled by 1.4 to fill the rest: 0.1, 0.4
    assert np.allclose(power_shares(r, q=2.0, floor=0.25, cap=1.5), [0.1, 0.4, 0.5])


def test_new_dynamic_terms_are_scale_free():
    rng = np.random.default_rng(1)
    prior, losses = rng.uniform(0.5, 2.0, 6), rng.uniform(0.2, 1.2, 6)
    for scale in (1e-3, 0.1, 7.0):
        assert np.allclose(mw_shares(prior, losses * scale, **MW), mw_shares(prior, losses, **MW))
        assert np.allclose(relative_losses(losses * scale), relative_losses(losses))
    for make in (lambda: DWFLMemory(), lambda: DWFLPower()):
        a, b = make(), make()
        for _ in range(3):  # the same over rounds: the state too sees only relative losses
            wa = a.aggregate(GLOBAL, [update(f"c{i}", 50 + i, float(l), 1.0) for i, l in enumerate(losses)], branch_of).weights
            wb = b.aggregate(GLOBAL, [update(f"c{i}", 50 + i, float(l) * 40, 1.0) for i, l in enumerate(losses)], branch_of).weights
            assert wa == wb


@pytest.mark.parametrize("make", [lambda: DWFLMemory(clip_factor=0), lambda: DWFLPower(clip_factor=0)])
def test_dynamic_share_sums_to_one_and_respects_caps_every_round(make):
    strategy = make()
    losses = [0.2, 0.3, 0.3, 0.4, 0.5, 3.0]  # one client far worse, every round
    k = len(losses)
    for _ in range(8):
        metas = [UpdateMeta(f"c{i}", 100, l) for i, l in enumerate(losses)]
        d = strategy.dynamic_shares(metas)
        assert d.sum() == pytest.approx(1.0) and np.all(d >= 0.25 / k - 1e-12) and np.all(d <= 3.0 / k + 1e-12)
        result = strategy.aggregate(GLOBAL, [update(m.client, 100, m.val_loss, 1.0) for m in metas], branch_of)
        w = np.array(list(result.weights["shared"].values()))
        assert w.sum() == pytest.approx(1.0, abs=1e-5)
        # the influence bound of the docstring: w_k <= (1 - beta) a_k + beta C / K (fresh updates)
        assert w.max() <= 0.7 / k + 0.3 * 3.0 / k + 1e-6
    assert d[-1] == pytest.approx(3.0 / k), "the client that stays worst reaches the cap"


def test_mw_memory_a_client_that_stays_worst_keeps_gaining():
    strategy = DWFLMemory(clip_factor=0)
    gains = []
    for _ in range(4):
        metas = [UpdateMeta("a", 100, 0.5), UpdateMeta("b", 100, 0.5), UpdateMeta("c", 100, 0.6)]
        gains.append(strategy.aggregate(GLOBAL, [update(m.client, 100, m.val_loss, 1.0) for m in metas], branch_of)
                     .weights["shared"]["c"])
    assert all(later > earlier for earlier, later in itertools.pairwise(gains)), gains
    # the old DW-FL forgets: the same losses give the same weight every round
    old = [DWFL().aggregate(GLOBAL, [update("a", 100, 0.5, 1.0), update("b", 100, 0.5, 1.0), update("c", 100, 0.6, 1.0)],
                            branch_of).weights["shared"]["c"] for _ in range(2)]
    assert old[0] == old[1] < gains[-1]


def test_mixed_weights_by_hand():
    n, d, tau = np.array([100, 300, 0]), np.array([0.5, 0.2, 0.3]), np.array([0, 3, 0])
    dd = np.array([0.5, 0.2, 0.0]) / 0.7  # the client without data never weighs
    raw = (0.7 * np.array([0.25, 0.75, 0]) + 0.3 * dd) * np.array([1.0, 0.5, 1.0])
    assert np.allclose(mixed_weights(n, d, tau, 0.3), raw / raw.sum())
    assert np.allclose(mixed_weights(n, d, np.zeros(3), 0.0), [0.25, 0.75, 0.0])


@pytest.mark.parametrize("name", ["dwfl_mw", "dwfl_pow", "qfedavg", "fedadam", "fedyogi"])
def test_new_strategies_are_permutation_invariant(name):
    rng = np.random.default_rng(0)
    ups = [update(f"c{i}", int(rng.integers(10, 200)), float(rng.uniform(0.1, 1.5)), float(rng.normal()),
                  staleness=int(rng.integers(0, 3)), r_ct=float(rng.uniform())) for i in range(6)]
    a, b = STRATEGIES[name](), STRATEGIES[name]()
    pa, pb = GLOBAL, GLOBAL
    for _ in range(3):  # the state too: after three rounds in two orders the strategies agree
        ra, rb = a.aggregate(pa, ups, branch_of), b.aggregate(pb, ups[::-1], branch_of)
        pa, pb = ra.params, rb.params
        for k in GLOBAL:
            assert np.allclose(pa[k], pb[k], atol=1e-6)
        for branch in ("shared", "ct"):
            assert ra.weights[branch] == pytest.approx(rb.weights[branch], abs=1e-6)
            assert sum(ra.weights[branch].values()) == pytest.approx(1.0, abs=1e-5)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(np.allclose(sa[k], sb[k]) for k in sa)


def test_qffl_by_hand_and_q_zero_is_fedavg():
    n, f, sq = np.array([100, 300]), np.array([0.5, 1.0]), np.array([4.0, 1.0])
    assert np.allclose(qffl_weights(n, f, 2.0), np.array([0.25 * 0.25, 0.75 * 1.0]) / 0.8125)
    # s = sum p F^q / sum p (F^q + q L F^(q-1) |D|^2) = 0.8125 / (0.8125 + 2*0.5*(0.25*0.5*4 + 0.75*1*1))
    assert qffl_step_scale(n, f, sq, 2.0, 0.5) == pytest.approx(0.8125 / (0.8125 + 1.25))
    assert qffl_step_scale(n, f, sq, 0.0, 0.5) == 1.0 and np.allclose(qffl_weights(n, f, 0.0), [0.25, 0.75])
    # through the strategy: deltas 1 and 3 everywhere (norm^2 7 and 63), q = 1, L = 0.1
    ups = [update("a", 100, 0.5, 1.0), update("b", 300, 1.0, 3.0)]
    w = np.array([0.25 * 0.5, 0.75 * 1.0]) / 0.875
    s = 0.875 / (0.875 + 0.1 * (0.25 * 7 + 0.75 * 63))
    result = QFedAvg(q=1.0, lipschitz=0.1, clip_factor=0).aggregate(GLOBAL, ups, branch_of)
    assert np.allclose(result.params["head.w"], s * (w[0] * 1.0 + w[1] * 3.0), atol=1e-6)
    assert result.weights["shared"]["b"] == pytest.approx(w[1], abs=1e-6)
    same = QFedAvg(q=0.0, clip_factor=0).aggregate(GLOBAL, ups, branch_of).params
    assert np.allclose(same["head.w"], FedAvg(clip_factor=0).aggregate(GLOBAL, ups, branch_of).params["head.w"])


def test_qffl_uses_each_clients_own_loss():
    ups = [update("a", 100, 0.2, 1.0), update("b", 100, 0.8, 1.0)]
    w = QFedAvg(q=2.0, clip_factor=0).aggregate(GLOBAL, ups, branch_of).weights["shared"]
    assert w["b"] / w["a"] == pytest.approx(16.0, rel=1e-4), "(0.8 / 0.2)^2: per-client F_k^q, not one shared loss"


def test_fedadam_and_fedyogi_by_hand():
    tau, lr = 1e-3, 0.1
    ups1, ups2 = [update("a", 1, 0.5, 1.0)], [update("a", 1, 0.5, -0.5)]
    # FedAdam: m1 = 0.1, v1 = 0.99 tau^2 + 0.01; m2 = 0.09 - 0.05, v2 = 0.99 v1 + 0.01 * 0.25
    m1, v1 = 0.1, 0.99 * tau ** 2 + 0.01
    m2, v2 = 0.9 * m1 - 0.05, 0.99 * v1 + 0.0025
    adam = FedAdam(server_lr=lr, tau=tau, clip_factor=0)
    p1 = adam.aggregate(GLOBAL, ups1, branch_of).params
    p2 = adam.aggregate(p1, ups2, branch_of).params
    expected1 = lr * m1 / (np.sqrt(v1) + tau)
    assert np.allclose(p1["head.w"], expected1, atol=1e-6)
    assert np.allclose(p2["head.w"], expected1 + lr * m2 / (np.sqrt(v2) + tau), atol=1e-6)
    # FedYogi: v1 = tau^2 - 0.01 * 1 * sign(tau^2 - 1) = tau^2 + 0.01; v2 = v1 - 0.01 * 0.25 * sign(v1 - 0.25)
    yv1 = tau ** 2 + 0.01
    yv2 = yv1 + 0.0025
    yogi = FedYogi(server_lr=lr, tau=tau, clip_factor=0)
    q1 = yogi.aggregate(GLOBAL, ups1, branch_of).params
    q2 = yogi.aggregate(q1, ups2, branch_of).params
    y1 = lr * m1 / (np.sqrt(yv1) + tau)
    assert np.allclose(q1["head.w"], y1, atol=1e-6)
    assert np.allclose(q2["head.w"], y1 + lr * m2 / (np.sqrt(yv2) + tau), atol=1e-6)
    assert not np.allclose(q2["head.w"], p2["head.w"])


@pytest.mark.parametrize("name", ["dwfl_mw", "dwfl_pow", "fedadam", "fedyogi"])
def test_new_strategy_state_survives_a_restart(name):
    rounds = [[update("a", 100, 0.3, 1.0), update("b", 50, 0.9, -1.0)],
              [update("a", 100, 0.4, 0.5), update("b", 50, 0.8, 2.0), update("new", 80, 0.6, 1.0)]]
    kept = STRATEGIES[name](clip_factor=0)
    params = kept.aggregate(GLOBAL, rounds[0], branch_of).params
    state = {k: np.array(v, copy=True) for k, v in kept.state_dict().items()}
    assert state, "the strategy keeps state"
    final = kept.aggregate(params, rounds[1], branch_of)
    restarted = STRATEGIES[name](clip_factor=0)
    restarted.load_state_dict(state)
    again = restarted.aggregate(params, rounds[1], branch_of)
    assert again.weights == final.weights
    for k in GLOBAL:
        assert np.allclose(again.params[k], final.params[k])
    fresh = STRATEGIES[name](clip_factor=0).aggregate(params, rounds[1], branch_of)
    assert fresh.weights != final.weights or not np.allclose(fresh.params["head.w"], final.params["head.w"]), \
        "without its state the round differs"
    with pytest.raises(BadInput, match="state entr"):
        STRATEGIES[name]().load_state_dict({"velocity/head.w": np.zeros(3)})


def test_an_unseen_client_starts_at_the_uniform_share():
    strategy = DWFLMemory(clip_factor=0)
    for _ in range(3):
        strategy.aggregate(GLOBAL, [update("a", 100, 0.5, 1.0), update("b", 100, 0.5, 1.0)], branch_of)
    metas = [UpdateMeta("a", 100, 0.5), UpdateMeta("b", 100, 0.5), UpdateMeta("new", 100, 0.5)]
    assert np.allclose(strategy.dynamic_shares(metas), 1 / 3)
    power = DWFLPower()
    assert np.allclose(power.dynamic_shares(metas), 1 / 3)


def test_state_is_committed_for_accepted_clients_only():
    strategy = DWFLMemory(clip_factor=0)
    bad = delta_of(1.0)
    bad["head.w"] = np.zeros(4, np.float32)
    result = strategy.aggregate(GLOBAL, [update("a", 100, 0.3, 1.0), update("b", 100, 0.9, 1.0, delta=bad),
                                         update("c", 100, 0.6, 1.0)], branch_of)
    assert result.accepted == ["a", "c"] and set(strategy.lam) == {"a", "c"}


def test_each_update_is_loaded_once_by_the_new_strategies():
    for name in ("dwfl_mw", "dwfl_pow", "qfedavg", "fedadam", "fedyogi"):
        loads = []

        def loader(i, loads=loads):
            def load():
                loads.append(i)
                return delta_of(float(i))
            return load

        ups = [ClientUpdate(UpdateMeta(f"c{i}", 10 + i, 0.5 + 0.1 * i), l2_norm(delta_of(float(i))), loader(i)) for i in range(3)]
        STRATEGIES[name]().aggregate(GLOBAL, ups, branch_of)
        assert loads == [0, 1, 2], name


def test_new_strategies_take_keyword_only_range_checked_settings():
    for cls in (DWFLMemory, DWFLPower, FedAdam, FedYogi, QFedAvg):
        with pytest.raises(TypeError):
            cls(0.3)  # noqa: keyword-only
    for make, words in [(lambda: DWFLMemory(eta=-1), "eta"), (lambda: DWFLMemory(smoothing=1.5), "smoothing"),
                        (lambda: DWFLMemory(floor=1.5), "floor"), (lambda: DWFLMemory(cap=0.5), "cap"),
                        (lambda: DWFLMemory(beta=2), "beta"), (lambda: DWFLPower(q=-1), "q ="),
                        (lambda: DWFLPower(memory=1.0), "memory"), (lambda: FedAdam(beta1=1.0), "beta1"),
                        (lambda: FedYogi(beta2=-0.1), "beta2"), (lambda: FedAdam(tau=0), "tau"),
                        (lambda: QFedAvg(q=-0.5), "q ="), (lambda: QFedAvg(lipschitz=0), "lipschitz")]:
        with pytest.raises(BadInput, match=words):
            make()


def test_an_enormous_claimed_loss_saturates_at_the_cap_and_never_makes_nan():
    """Review finding: with eta 4 and 200 clinics, one val_loss of 1e300 made every share NaN (exp
    overflow), so one clinic could fail every round."""
    from federation.aggregation import DWFLMemory, DWFLPower, mw_shares, power_shares

    losses = np.full(200, 0.6)
    losses[7] = 1e300
    for shares in (mw_shares(np.ones(200), losses, eta=4.0, smoothing=0.1, floor=0.25, cap=3.0),
                   power_shares(losses / losses.mean(), q=10.0, floor=0.25, cap=3.0)):
        assert np.all(np.isfinite(shares)) and abs(shares.sum() - 1) < 1e-9
        assert shares[7] == pytest.approx(3.0 / 200) and shares.max() == shares[7]
    ups = [update(f"c{i}", 100, 1e300 if i == 0 else 0.5, 0.1 * (i + 1)) for i in range(4)]
    for strategy in (DWFLMemory(eta=4.0), DWFLPower(q=10.0)):
        result = strategy.aggregate(GLOBAL, ups, branch_of)
        assert all(np.all(np.isfinite(v)) for v in result.params.values())
        assert result.weights["shared"]["c0"] <= 0.7 * 0.25 + 0.3 * 3.0 / 4 + 1e-6
