"""The clinic's fine-tuning math: numpy head gradients, DP-SGD pieces, accountant and ledger."""

from __future__ import annotations

import json

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from edge_runtime.finetune import dpsgd
from edge_runtime.finetune.head import forward, losses, param_shapes, per_example_grads
from edge_runtime.privacy.accountant import (
    BudgetExhausted,
    RoundEvents,
    epsilon,
    plan_round,
)
from edge_runtime.privacy.ledger import Ledger, LedgerError, LedgerMismatch, _digest

DIM, CLASSES = 6, 2


def random_params(seed: int, dim: int = DIM, scale: float = 0.5) -> dict:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, scale, s) for k, s in param_shapes(dim, CLASSES).items()}


def random_batch(seed: int, b: int = 5, dim: int = DIM):
    rng = np.random.default_rng(seed)
    mask = (rng.random((b, 3)) > 0.35).astype(np.float64)
    mask[np.arange(b), rng.integers(0, 3, b)] = 1.0  # never empty
    emb = rng.normal(0, 1, (b, 3, dim)) * mask[..., None]
    return emb, mask, rng.integers(0, CLASSES, b)


def test_per_example_gradients_match_finite_differences():
    params = random_params(0)
    emb, mask, y = random_batch(1)
    _, grads = per_example_grads(params, emb, mask, y)
    rng, eps = np.random.default_rng(2), 1e-6
    for name, value in params.items():
        for _ in range(4):
            idx = tuple(rng.integers(0, s) for s in value.shape)
            plus, minus = {k: v.copy() for k, v in params.items()}, {k: v.copy() for k, v in params.items()}
            plus[name][idx] += eps
            minus[name][idx] -= eps
            numeric = (losses(plus, emb, mask, y) - losses(minus, emb, mask, y)) / (2 * eps)  # one per example
            np.testing.assert_allclose(grads[name][(slice(None), *idx)], numeric, rtol=1e-5, atol=1e-7, err_msg=name)


def test_absent_modalities_get_no_gradient_and_no_weight():
    params = random_params(3)
    emb, mask, y = random_batch(4, b=8)
    mask[:, 2] = 0.0
    _, grads = per_example_grads(params, emb, mask, y)
    assert np.all(grads["adapters.2.lin.weight"] == 0) and np.all(grads["adapters.2.lin.bias"] == 0)
    emb2 = emb.copy()
    emb2[:, 2] = 100.0  # whatever sits in an absent slot does not matter
    np.testing.assert_allclose(forward(params, emb, mask), forward(params, emb2, mask), atol=1e-9)


def test_gradients_match_torch_autograd():
    torch = pytest.importorskip("torch")
    from export.models import StudentHead

    params = random_params(5)
    emb, mask, y = random_batch(6, b=7)
    head = StudentHead(DIM, CLASSES).double()
    head.load_state_dict({k: torch.tensor(v) for k, v in params.items()})
    _, grads = per_example_grads(params, emb, mask, y)
    for b in range(len(y)):
        head.zero_grad()
        logits = head(torch.tensor(emb[b:b + 1]), torch.tensor(mask[b:b + 1]))
        np.testing.assert_allclose(logits.detach().numpy(), forward(params, emb[b:b + 1], mask[b:b + 1]), atol=1e-10)
        torch.nn.functional.cross_entropy(logits, torch.tensor(y[b:b + 1])).backward()
        for name, p in head.named_parameters():
            np.testing.assert_allclose(grads[name][b], p.grad.numpy(), rtol=1e-7, atol=1e-10, err_msg=name)


def test_clipping_bounds_every_per_example_gradient():
    params = random_params(7, scale=2.0)
    emb, mask, y = random_batch(8, b=32)
    emb *= 5.0
    _, grads = per_example_grads(params, emb, mask, y)
    names = sorted(grads)
    norms = dpsgd.per_example_norms(grads, names)
    clip = float(np.median(norms))
    assert (norms > clip).sum() >= 10, "the test must clip something"
    for b in range(len(y)):
        one = {k: g[b:b + 1] for k, g in grads.items()}
        summed, _ = dpsgd.clipped_sum(one, names, clip)
        norm = np.sqrt(sum(np.square(v).sum() for v in summed.values()))
        assert norm <= clip * (1 + 1e-9)
        if norms[b] <= clip:  # unclipped examples are untouched
            np.testing.assert_allclose(norm, norms[b], rtol=1e-9)


def test_noise_scale_is_sigma_times_clip():
    rng = np.random.default_rng(9)
    zeros = {"a": np.zeros((400, 500)), "b": np.zeros(1000)}
    noisy = dpsgd.add_noise(zeros, rng, sigma=3.0, clip=0.7)
    values = np.concatenate([v.ravel() for v in noisy.values()])
    assert abs(values.std() / (3.0 * 0.7) - 1) < 0.01 and abs(values.mean()) < 0.01


def test_poisson_sampling_rate():
    rng = np.random.default_rng(10)
    sizes = [len(dpsgd.poisson_sample(rng, 1000, 0.05)) for _ in range(400)]
    assert abs(np.mean(sizes) - 50) < 1.5 and np.std(sizes) > 3  # variable size: Poisson, not fixed batches


def test_dpsgd_learns_without_noise_and_with_small_noise():
    rng = np.random.default_rng(11)
    n, dim = 600, DIM
    y = rng.integers(0, 2, n)
    mask = np.ones((n, 3))
    emb = rng.normal(0, 1, (n, 3, dim)) + (2 * y - 1)[:, None, None] * 0.8
    params = {k: np.zeros(s) for k, s in param_shapes(dim, CLASSES).items()}
    read = lambda idx: (emb[idx], mask[idx], y[idx])  # noqa: E731
    before = losses(params, emb, mask, y).mean()
    for sigma, clip in ((0.0, None), (0.5, 1.0)):
        spec = dpsgd.TrainSpec(steps=60, sampling_rate=0.1, noise_multiplier=sigma, clip=clip, lr=0.05)
        trained = dpsgd.train(params, n, read, spec, np.random.default_rng(12))
        assert losses(trained, emb, mask, y).mean() < 0.6 * before


def direct_epsilon(rounds: list[tuple[float, float, int, float]], delta: float) -> float:
    acc = rdp.RdpAccountant()
    for q, sigma, steps, meta in rounds:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
        acc.compose(dp_accounting.GaussianDpEvent(meta))
    return acc.get_epsilon(delta)


def test_planned_round_fits_and_uses_the_budget():
    plan = plan_round([], n_train=1600, batch_size=256, epochs=10, meta_noise_multiplier=20.0, epsilon_total=0.5, delta=1e-5)
    ev = plan.events
    assert ev.steps == 63 and ev.sampling_rate == pytest.approx(0.16)
    assert 0.49 <= plan.epsilon_after <= 0.5
    assert ev.meta_noise_multiplier >= 20.0
    assert plan.epsilon_after == pytest.approx(direct_epsilon([(ev.sampling_rate, ev.noise_multiplier, ev.steps, ev.meta_noise_multiplier)], 1e-5))
    with pytest.raises(BudgetExhausted, match="budget"):  # a full round leaves nothing
        plan_round([ev], 1600, 256, 10, 20.0, 0.5, 1e-5)
    with pytest.raises(BudgetExhausted, match="budget"):
        plan_round([RoundEvents(0.16, ev.noise_multiplier * 0.5, 63, 20.0)], 1600, 256, 10, 20.0, 0.5, 1e-5)


def test_ledger_epsilon_matches_direct_computation_and_persists(tmp_path):
    ledger = Ledger(tmp_path / "p", "clinic-a", "ds", epsilon_total=0.5, delta=1e-5)
    rounds = [(0.1, 12.0, 30, 30.0), (0.25, 15.0, 12, 40.0)]
    for i, (q, s, steps, meta) in enumerate(rounds):
        ledger.charge(f"r{i}", RoundEvents(q, s, steps, meta))
    again = Ledger(tmp_path / "p", "clinic-a", "ds", epsilon_total=0.5, delta=1e-5)
    assert len(again.charges) == 2
    assert again.spent() == pytest.approx(direct_epsilon(rounds, 1e-5), rel=1e-12)
    assert 0 < again.spent() < 0.5
    assert again.summary()["epsilon_left"] == pytest.approx(0.5 - again.spent(), abs=1e-6)
    assert again.charges[-1].epsilon_after == pytest.approx(again.spent())


@pytest.mark.parametrize("damage", ["edit_sigma", "drop_last_line", "reorder", "garbage", "delete_head", "other_clinic"])
def test_edited_or_corrupt_ledger_is_refused(tmp_path, damage):
    folder = tmp_path / "p"
    ledger = Ledger(folder, "clinic-a", "ds", epsilon_total=0.5, delta=1e-5)
    for i in range(3):
        ledger.charge(f"r{i}", RoundEvents(0.1, 8.0, 10, 20.0))
    path = folder / "ledger.jsonl"
    lines = path.read_text().splitlines()
    if damage == "edit_sigma":
        entry = json.loads(lines[1])
        entry["events"]["noise_multiplier"] = 80.0  # a smaller charge
        lines[1] = json.dumps(entry, sort_keys=True)
    elif damage == "drop_last_line":
        lines = lines[:-1]
    elif damage == "reorder":
        lines = [lines[1], lines[0], lines[2]]
    elif damage == "garbage":
        lines[2] = lines[2][:40]
    if damage == "delete_head":
        (folder / "ledger.head.json").unlink()
    elif damage != "other_clinic":
        path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerError):
        Ledger(folder, "clinic-b" if damage == "other_clinic" else "clinic-a", "ds", epsilon_total=0.5, delta=1e-5)


def test_crash_between_ledger_line_and_head_counts_the_charge(tmp_path):
    folder = tmp_path / "p"
    ledger = Ledger(folder, "clinic-a", "ds", epsilon_total=0.5, delta=1e-5)
    ledger.charge("r0", RoundEvents(0.1, 8.0, 10, 20.0))
    head_before = (folder / "ledger.head.json").read_bytes()
    ledger.charge("r1", RoundEvents(0.1, 8.0, 10, 20.0))
    (folder / "ledger.head.json").write_bytes(head_before)  # as if the process died before the head write
    again = Ledger(folder, "clinic-a", "ds", epsilon_total=0.5, delta=1e-5)
    assert len(again.charges) == 2
    assert again.spent() == pytest.approx(epsilon([RoundEvents(0.1, 8.0, 10, 20.0)] * 2, 1e-5))


def test_lifetime_budget_is_fixed_by_the_first_round(tmp_path):
    ledger = Ledger(tmp_path / "p", "clinic-a", "ds", epsilon_total=0.5, delta=1e-5)
    ledger.charge("r0", RoundEvents(0.1, 12.0, 30, 30.0))
    assert Ledger(tmp_path / "p", "clinic-a", "ds", epsilon_total=None, delta=1e-5).epsilon_total == 0.5, "status reads the recorded budget"
    for other in (5.0, 0.3):  # more, or less (spend less per round with --round-epsilon instead)
        with pytest.raises(LedgerMismatch, match="epsilon of dataset 'ds' was fixed at 0.5 by its first round") as err:
            Ledger(tmp_path / "p", "clinic-a", "ds", epsilon_total=other, delta=1e-5)
        assert "\n" not in str(err.value) and "corrupt" not in str(err.value)


def test_ledger_is_authoritative_for_delta_and_records_its_accountant(tmp_path):
    """Regression (issue 13): a ledger written at delta 1e-6 is read at 1e-6 by a caller that passes
    nothing (doctor, status); a caller passing 1e-5 gets a one-line refusal, never "corrupt"."""
    folder = tmp_path / "p"
    Ledger(folder, "clinic-a", "ds", epsilon_total=1.0, delta=1e-6).charge("r0", RoundEvents(0.1, 12.0, 30, 30.0))
    entry = json.loads((folder / "ledger.jsonl").read_text())
    assert entry["delta"] == 1e-6 and entry["epsilon_total"] == 1.0 and entry["accountant"] == "rdp" and entry["dp_accounting"]
    read = Ledger(folder, "clinic-a", "ds")
    assert read.delta == 1e-6 and read.epsilon_total == 1.0
    assert read.spent() == pytest.approx(epsilon([RoundEvents(0.1, 12.0, 30, 30.0)], 1e-6))
    assert read.summary()["delta"] == 1e-6 and read.summary()["accountant"] == "rdp"
    with pytest.raises(LedgerMismatch, match="delta of dataset 'ds' was fixed at 1e-06") as err:
        Ledger(folder, "clinic-a", "ds", epsilon_total=None, delta=1e-5)
    assert "corrupt" not in str(err.value) and err.value.exit_code == 1


def test_ledger_written_before_parameters_were_recorded_still_reads(tmp_path):
    """Lines of today's format (no accountant / dp-accounting version) read as the RDP accountant."""
    folder = tmp_path / "p"
    ledger = Ledger(folder, "clinic-a", "ds", epsilon_total=0.5, delta=1e-5)
    for i in range(2):
        ledger.charge(f"r{i}", RoundEvents(0.1, 12.0, 30, 30.0))
    old, prev = [], "0" * 64
    for line in (folder / "ledger.jsonl").read_text().splitlines():
        entry = {k: v for k, v in json.loads(line).items() if k not in ("accountant", "dp_accounting", "hash")}
        entry["prev"] = prev
        entry["hash"] = prev = _digest(entry)
        old.append(json.dumps(entry, sort_keys=True))
    (folder / "ledger.jsonl").write_text("\n".join(old) + "\n")
    head = json.loads((folder / "ledger.head.json").read_text())
    (folder / "ledger.head.json").write_text(json.dumps({**head, "last_hash": prev}))
    again = Ledger(folder, "clinic-a", "ds")
    assert len(again.charges) == 2 and again.delta == 1e-5 and again.summary()["accountant"] == "rdp"
    again.charge("r2", RoundEvents(0.1, 12.0, 30, 30.0))  # appends in the new format after old lines
    assert len(Ledger(folder, "clinic-a", "ds").charges) == 3


def test_torn_last_line_is_dropped_and_the_next_charge_follows(tmp_path):
    """Regression (issue 14): a process that died inside an append leaves a cut line the head record
    never counted; it is dropped (nothing of that round was released), never a lock-out."""
    folder = tmp_path / "p"
    ledger = Ledger(folder, "clinic-a", "ds", epsilon_total=0.5, delta=1e-5)
    ledger.charge("r0", RoundEvents(0.1, 12.0, 30, 30.0))
    whole = (folder / "ledger.jsonl").read_bytes()
    with open(folder / "ledger.jsonl", "ab") as fh:
        fh.write(whole[:57])  # a second line cut mid-way
    again = Ledger(folder, "clinic-a", "ds")
    assert len(again.charges) == 1, "torn bytes ignored"
    # A reader never cuts: the bytes could be another run's append still being written (review finding).
    assert (folder / "ledger.jsonl").read_bytes() == whole + whole[:57]
    again.charge("r1", RoundEvents(0.1, 12.0, 30, 30.0))  # under the ledger lock: cut, then appended
    assert (folder / "ledger.jsonl").read_bytes().startswith(whole + b"{") and b"\n{" in (folder / "ledger.jsonl").read_bytes()
    assert [c.seq for c in Ledger(folder, "clinic-a", "ds").charges] == [1, 2]
    with open(folder / "ledger.jsonl", "ab") as fh:  # torn bytes appear under a reader that already read
        fh.write(b'{"format": 1, "se')
    again.charge("r2", RoundEvents(0.1, 12.0, 30, 30.0))
    assert [c.round_id for c in Ledger(folder, "clinic-a", "ds").charges] == ["r0", "r1", "r2"]


def test_a_budget_or_delta_close_to_the_recorded_one_keeps_the_recorded_value(tmp_path):
    """Review finding: a value isclose() to the recorded one was written into the next line as asked,
    and the next read refused that line as an edit (a lock-out)."""
    folder = tmp_path / "p"
    Ledger(folder, "clinic-a", "ds", epsilon_total=0.5, delta=1e-5).charge("r0", RoundEvents(0.1, 12.0, 30, 30.0))
    near = Ledger(folder, "clinic-a", "ds", epsilon_total=0.5 * (1 + 1e-12), delta=1e-5 * (1 - 1e-12))
    assert near.epsilon_total == 0.5 and near.delta == 1e-5
    near.charge("r1", RoundEvents(0.1, 12.0, 30, 30.0))
    assert len(Ledger(folder, "clinic-a", "ds").charges) == 2


def test_a_torn_line_the_head_counts_is_still_refused(tmp_path):
    folder = tmp_path / "p"
    ledger = Ledger(folder, "clinic-a", "ds", epsilon_total=0.5, delta=1e-5)
    for i in range(2):
        ledger.charge(f"r{i}", RoundEvents(0.1, 12.0, 30, 30.0))
    data = (folder / "ledger.jsonl").read_bytes()
    (folder / "ledger.jsonl").write_bytes(data[:-30])  # the counted last line cut: an under-count
    with pytest.raises(LedgerError, match="truncated or edited"):
        Ledger(folder, "clinic-a", "ds")


def test_too_small_round_epsilon_says_so():
    """Regression (issue 14, 10c): the cap of the round is what is too small, not the budget left."""
    for cap in (5e-4, 2e-3):
        with pytest.raises(BudgetExhausted) as err:
            plan_round([], 1600, 256, 10, 20.0, 0.5, 1e-5, round_epsilon=cap)
        assert "--round-epsilon" in str(err.value) and f"({cap:g}" in str(err.value) and "budget spent" not in str(err.value)
    with pytest.raises(BudgetExhausted, match="privacy budget spent"):
        plan_round([RoundEvents(0.16, 1.0, 63, 20.0)], 1600, 256, 10, 20.0, 0.5, 1e-5, round_epsilon=0.1)


def test_validation_split_is_stable_and_keeps_both_classes():
    from edge_runtime.finetune.run import validation_split

    ids = [f"case-{i:04d}" for i in range(60)]
    labels = np.array([1] * 4 + [0] * 56)  # a rare class: the plain hash split often misses it
    for clinic in (f"clinic-{k}" for k in range(40)):
        val = validation_split(clinic, ids, labels, 0.2)
        assert val[labels == 1].sum() >= 2 and (~val[labels == 1]).sum() >= 2 and val[labels == 0].sum() >= 2 and (~val[labels == 0]).sum() >= 2
        assert np.array_equal(val, validation_split(clinic, ids, labels, 0.2)), "stable across rounds"
        assert 0.1 < val.mean() < 0.35
