"""Issue 17: the federation's fine-tuning plan (budget split, trainable subset), the simulation the
gain benchmark runs (one simulated round equals one round through `edge-server` + `edge-run sync`
on loopback), and the clinic's gate on pulled versions (scored locally, a regressing one held back)."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

from edge_runtime.bundle import MANIFEST, write_bundle
from edge_runtime.errors import BadInput
from edge_runtime.finetune.head import params_bytes, param_shapes
from edge_runtime.finetune.plan import FEDERATED_PLAN, FinetunePlan, trainable_subset
from edge_runtime.keys import load_private_key
from edge_runtime.privacy.accountant import epsilon, plan_round
from edge_runtime.sync import update as codec
from federation.aggregation import ClientUpdate, FedAvg, UpdateMeta
from server.rounds import aggregate_head

from .server_util import ServerProcess, edge_server
from .test_finetune_cli import run as edge_run
from .test_sync_e2e import CLINICS, manifests  # noqa: F401  (the module fixture: three clinics' case files)


@pytest.mark.parametrize("n_train", [80, 320, 5000])
def test_plan_splits_the_lifetime_budget_evenly_and_ends_at_it(n_train):
    rounds = []
    for r in range(10):
        plan = plan_round(rounds, n_train, 1024, 3.0, 20.0, 0.5, 1e-5, rounds_left=10 - r)
        rounds.append(plan.events)
        assert plan.epsilon_after <= 0.5
    assert len(set(rounds)) == 1, "a clinic whose cases did not change runs identical rounds"
    assert 0.499 <= epsilon(rounds, 1e-5) <= 0.5
    with pytest.raises(Exception, match="budget spent"):
        plan_round(rounds, n_train, 1024, 3.0, 20.0, 0.5, 1e-5, rounds_left=1)


def test_plan_with_changing_cases_still_ends_within_the_budget():
    rounds = []
    for r, n in enumerate([300, 300, 340, 400, 400, 420, 500, 500, 500, 520]):
        rounds.append(plan_round(rounds, n, 256, 3.0, 20.0, 0.5, 1e-5, rounds_left=10 - r).events)
    assert 0.49 <= epsilon(rounds, 1e-5) <= 0.5
    one = plan_round([], 300, 256, 3.0, 20.0, 0.5, 1e-5)  # rounds_left 1: today's rule, all of it now
    assert 0.499 <= one.epsilon_after <= 0.5 and one.events.noise_multiplier < rounds[0].noise_multiplier


def test_a_round_cap_limits_a_planned_round_and_never_raises_it():
    share = plan_round([], 320, 1024, 3.0, 20.0, 0.5, 1e-5, rounds_left=10)
    spent = share.epsilon_after
    for cap in (spent / 2, spent * 2, 0.4):
        capped = plan_round([], 320, 1024, 3.0, 20.0, 0.5, 1e-5, round_epsilon=cap, rounds_left=10)
        assert capped.epsilon_after <= min(cap, spent) + 1e-9, cap


def test_plan_checks_its_settings(micro_out):
    from export.config import get_config

    assert get_config("tiny").finetune == FEDERATED_PLAN, "the demo's bundle carries the shipped plan"
    assert json.loads((micro_out / "bundle" / MANIFEST).read_text())["finetune"] == get_config("micro").finetune.to_dict()
    assert FinetunePlan.from_dict(FEDERATED_PLAN.to_dict()) == FEDERATED_PLAN
    for bad, needle in [({"trainable": "adapters"}, "trainable"), ({"rounds": 0}, "rounds"), ({"optimizer": "lbfgs"}, "optimizer"),
                        ({"lr": -1.0}, "lr"), ({"colour": 1}, "unknown")]:
        with pytest.raises(BadInput, match=needle):
            FinetunePlan.from_dict({**FEDERATED_PLAN.to_dict(), **bad})
    assert FinetunePlan.of_manifest({}) == FinetunePlan(), "a bundle without a plan keeps the rule it had"


def test_update_and_aggregation_respect_the_trainable_subset():
    rng = np.random.default_rng(0)
    head = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in param_shapes(16, 2).items()}
    plan = FinetunePlan(trainable="classifier")
    reference = trainable_subset(head, plan)
    assert sorted(reference) == ["classifier.bias", "classifier.weight"]
    meta = {"n": 50, "val_loss": 0.6, "modality_fraction": {}, "noise_multiplier": 1.0}
    sub = {k: np.full(v.shape, 0.01, np.float32) for k, v in reference.items()}
    summary = codec.validate(codec.decode(codec.encode(sub, meta)), reference)
    assert summary.norm > 0
    full = {k: np.zeros(v.shape, np.float32) for k, v in head.items()}
    with pytest.raises(codec.UpdateError, match="names differ"):  # a change to a frozen parameter is refused
        codec.validate(codec.decode(codec.encode(full, meta)), reference)
    wrong = {**sub, "classifier.weight": np.zeros((2, 8), np.float32)}
    with pytest.raises(codec.UpdateError, match="shape"):
        codec.validate(codec.decode(codec.encode(wrong, meta)), reference)
    ups = [ClientUpdate.in_memory(UpdateMeta(f"c{i}", 50, 0.6), sub) for i in range(3)]
    result = aggregate_head(FedAvg(clip_factor=0.0), head, ups, plan)
    assert set(result.params) == set(head)
    for name in head:
        moved = float(np.abs(result.params[name] - head[name]).max())
        assert (moved == pytest.approx(0.01, abs=1e-6)) if name.startswith("classifier.") else moved == 0.0, name


def _wait_closed(home, n: int) -> list[dict]:
    deadline = time.time() + 60
    while time.time() < deadline:
        rs = json.loads(edge_server("rounds", "--home", str(home), "--json").stdout)
        if len(rs) >= n and rs[n - 1]["state"] == "closed":
            return rs
        time.sleep(0.3)
    raise AssertionError("round not aggregated in time")


def _wait_version(home, version: int) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        if any(r.get("result_version") == version for r in json.loads(edge_server("rounds", "--home", str(home), "--json").stdout)):
            return
        time.sleep(0.3)
    raise AssertionError(f"version {version} not aggregated in time")


def test_a_simulated_round_equals_a_round_through_the_server(tmp_path, micro_out, manifests):  # noqa: F811
    from edge_runtime import MODALITIES
    from edge_runtime.bundle import load_bundle
    from edge_runtime.finetune.cache import EmbeddingCache
    from edge_runtime.finetune.run import check_labels, fill_cache
    from edge_runtime.keys import load_public_key
    from edge_runtime.manifest import read_manifest
    from edge_runtime.model import EdgeModel
    from edge_runtime.state import bundle_head
    from edge_runtime.variants import resolve_variant
    from server.home import Home
    from server.service import Server
    from server.simulation import SimClinic, clinic_round, server_round

    home, planned = tmp_path / "srv", _resigned(micro_out, tmp_path / "planned" / "bundle")
    assert edge_server("init", "--home", str(home), "--min-clients", "3").returncode == 0
    assert edge_server("publish", "--home", str(home), str(planned), "--trusted-key", str(planned.parent / "bundle.pub")).returncode == 0
    srv = ServerProcess(home, None).start()
    seeds = {(name, rnd): 40 + 10 * rnd + i for i, name in enumerate(CLINICS) for rnd in (1, 2)}
    try:
        for name in CLINICS:
            token = edge_server("token", "--home", str(home), "--clinic", name).stdout.strip()
            assert edge_run("enroll", "--server", srv.url, "--token", token, "--state", str(tmp_path / name)).returncode == 0
        for rnd in (1, 2):  # two rounds: the second starts from the first's head and the strategy's saved state
            for name in CLINICS:
                proc = edge_run("sync", "--state", str(tmp_path / name), "--manifest", str(manifests[name]),
                                "--seed", str(seeds[name, rnd]), "--json")
                assert proc.returncode == 0, proc.stderr
                assert json.loads(proc.stdout)["finetune"]["privacy"]["epsilon_spent"] < 0.5 / 2, "the plan's first of 10 rounds"
            _wait_closed(home, rnd)
    finally:
        srv.stop()
    server = Server(Home(home))

    bundle = load_bundle(tmp_path / "north" / "bundles" / "v1", load_public_key(tmp_path / "north" / "sync" / "server.pub"))
    start = bundle_head(bundle)[0]
    plan = FinetunePlan.of_manifest(bundle.manifest)
    assert plan == FEDERATED_PLAN, "the plan travels with every version"
    variant, _ = resolve_variant(bundle, None, None)
    model = EdgeModel.from_bundle(bundle, variant, threads=2)
    clinics = {}
    for name in sorted(CLINICS):
        cases = read_manifest(manifests[name])
        labelled = check_labels(cases, bundle.classes)
        cache = EmbeddingCache(tmp_path / f"sim-{name}", f"{name}-key", model.dim, len(MODALITIES))
        rows, rejected = fill_cache(model, bundle, cases, cache, set(labelled.case_ids))
        assert not rejected
        emb, mask = cache.read(np.array([rows[c] for c in labelled.case_ids]))
        cache.close()
        clinics[name] = SimClinic(name, labelled.case_ids, emb, mask, labelled.labels)
    head, kept = start, None
    for rnd, version in ((1, 2), (2, 3)):
        updates = [(name, *clinic_round(c, head, plan, np.random.default_rng(seeds[name, rnd]))) for name, c in clinics.items()]
        result, kept = server_round(server.config, head, plan, updates, kept)
        published = server.head_params(version)
        assert set(result.params) == set(published)
        diff = max(float(np.abs(result.params[k] - published[k]).max()) for k in published)
        assert diff <= 1e-6, (rnd, diff)
        assert max(float(np.abs(published[k] - head[k]).max()) for k in plan.names(head)) > 1e-3, "the round moved the head"
        head = {k: np.asarray(v, dtype=np.float32) for k, v in result.params.items()}
    assert kept, "the default strategy keeps state across rounds (dwfl_mw's lambda): the simulation carries it"
    frozen = [k for k in start if k not in plan.names(start)]
    assert frozen and all(np.array_equal(published[k], start[k]) for k in frozen), "parameters outside the plan stay"


def _resigned(micro_out, dest, *, plan: FinetunePlan = FEDERATED_PLAN, flip: bool = False, model_version: str = "1"):
    """A copy of the micro bundle with ``plan`` signed in by its exporter (the micro config keeps the
    rule before plans for the other tests); ``flip``: its classifier turned around (AUC ~ 1 - AUC)."""
    src = micro_out / "bundle"
    manifest = json.loads((src / MANIFEST).read_text())
    dest.parent.mkdir(parents=True, exist_ok=True)
    files = {name: src / name for name in manifest["files"]}
    if flip:
        head = dict(np.load(src / "head.npz"))
        head = {**head, "classifier.weight": -head["classifier.weight"], "classifier.bias": -head["classifier.bias"]}
        files["head.npz"] = dest.parent / "head-flipped.npz"
        files["head.npz"].write_bytes(params_bytes(head))
    body = {k: v for k, v in manifest.items() if k not in ("signature", "files", "format_version")}
    write_bundle(dest, files, {**body, "model_version": model_version, "finetune": plan.to_dict()},
                 load_private_key(micro_out / "signing_key.pem"))
    shutil.copy(micro_out / "bundle.pub", dest.parent / "bundle.pub")
    return dest


def test_a_regressing_version_is_held_back_and_status_says_so(tmp_path, micro_out, manifests):  # noqa: F811
    home, state, planned = tmp_path / "srv", tmp_path / "state", _resigned(micro_out, tmp_path / "planned" / "bundle")
    publish = ["publish", "--home", str(home), str(planned), "--trusted-key", str(planned.parent / "bundle.pub")]
    assert edge_server("init", "--home", str(home), "--min-clients", "1").returncode == 0
    assert edge_server(*publish).returncode == 0
    srv = ServerProcess(home, None).start()
    try:
        token = edge_server("token", "--home", str(home), "--clinic", "solo").stdout.strip()
        assert edge_run("enroll", "--server", srv.url, "--token", token, "--state", str(state)).returncode == 0
        first = edge_run("sync", "--state", str(state), "--manifest", str(manifests["north"]), "--seed", "5", "--json")
        assert first.returncode == 0, first.stderr
        act = json.loads(first.stdout)["activation"]
        assert act["status"] == "active" and act["scored"] and act["version"] == 1
        _wait_closed(home, 1)  # the clinic's update made version 2

        bad = _resigned(micro_out, tmp_path / "bad" / "bundle", flip=True, model_version="1-bad")
        assert edge_server("publish", "--home", str(home), str(bad), "--trusted-key", str(bad.parent / "bundle.pub")).returncode == 0
        proc = edge_run("sync", "--state", str(state), "--manifest", str(manifests["north"]), "--seed", "6", "--json")
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        act = report["activation"]
        assert report["version"] == 3 and act["status"] == "held back", act
        assert act["val_auc"] < act["in_use_val_auc"] - act["tolerance"] and "below the version in use" in act["reason"]
        assert json.loads((state / "bundles" / "current.json").read_text())["version"] == 1, "the version in use stays"
        assert (state / "bundles" / "v3").is_dir(), "kept aside, not deleted (the round's base for fine-tuning)"

        status = edge_run("status", "--state", str(state), "--json")
        versions = {v["version"]: v for v in json.loads(status.stdout)["versions"]}
        assert versions[1]["status"] == "active" and versions[3]["status"] == "held back"
        assert all(isinstance(v["val_auc"], float) for v in versions.values())
        text = edge_run("status", "--state", str(state)).stdout
        assert "version 3 (1-bad): held back, local validation AUC" in text

        # the clinic still took part in the round on version 3 (its base), which made version 4; then a
        # good version (the first bundle, republished as version 5) goes live
        _wait_version(home, 4)
        assert edge_server(*publish).returncode == 0
        proc = edge_run("sync", "--state", str(state), "--manifest", str(manifests["north"]), "--seed", "7", "--json")
        act = json.loads(proc.stdout)["activation"]
        assert proc.returncode == 0 and act["status"] == "active" and act["version"] == 5, act
        assert json.loads((state / "bundles" / "current.json").read_text())["version"] == 5
        versions = {v["version"]: v["status"] for v in json.loads(edge_run("status", "--state", str(state), "--json").stdout)["versions"]}
        assert versions == {1: "replaced", 3: "held back", 5: "active"}
        kept = sorted(f.name for f in (state / "bundles").glob("v*"))
        assert kept == ["v1", "v5"], "the version in use and the one it replaced stay; the held-back one goes"
    finally:
        srv.stop()


def test_an_unreadable_version_record_is_set_aside_not_fatal(tmp_path):
    from edge_runtime.state import ClinicState

    st = ClinicState(tmp_path / "state")
    st.root.mkdir(parents=True)
    st.versions_file.write_text("{not json")
    assert st.version_log() == []
    assert st.versions_file.with_suffix(".json.unreadable").read_text() == "{not json"
    st.record_version({"version": 2, "status": "active"})
    assert st.version_log() == [{"version": 2, "status": "active"}]
