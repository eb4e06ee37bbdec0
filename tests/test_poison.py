"""One enrolled clinic trying to poison the global model (issue 14, item 3), at each depth: what a
clinic may claim is bounded on arrival (422 with the reason, nothing stored); within those bounds one
update moves the global head by at most weight cap x clip ceiling; an aggregated head that is not
finite or too large is never published (the round fails with the reason); and the runtime never
prints a non-finite probability (`infer --json` output is always strict JSON).

Every test here fails on the main of issue 14: the attack was stored, the huge aggregate published,
and `infer --json` printed ``"probability": NaN`` with exit 0."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select

from edge_runtime.bundle import MANIFEST, sign_manifest
from edge_runtime.errors import BadInput
from edge_runtime.keys import generate_key, save_public_key
from edge_runtime.state import ClinicState
from edge_runtime.sync import protocol
from edge_runtime.sync import update as codec
from edge_runtime.sync.hpke import HpkePublic
from federation.aggregation import l2_norm
from server import db
from server import rounds as rounds_mod
from server.home import Config
from server.service import Refusal, Server

from .conftest import edge_run
from .server_util import ServerProcess, published_server, write_fake_update
from .test_server import blob_count, clinic, make_home, rounds


@pytest.fixture
def head(micro_out):
    with np.load(micro_out / "bundle" / "head.npz") as z:
        return {k: z[k] for k in z.files}


def crafted(state: Path, head: dict, *, value: float, n: int, sigma: float) -> tuple[Path, str]:
    """An update as an attacker writes it with the clinic's own writer: every delta value ``value``,
    claimed ``n`` cases and DP-SGD noise multiplier ``sigma``."""
    uid = f"evil-{uuid.uuid4().hex[:8]}"
    delta = {k: np.full(v.shape, value, np.float32) for k, v in head.items()}
    meta = {"update_id": uid, "n": n, "val_loss": 3.0, "noise_multiplier": sigma,
            "modality_fraction": {"ct": 1.0, "pathology": 1.0, "genomics": 1.0}}
    return ClinicState(state).write_update(uid, delta, meta), uid


def strict_json(line: str) -> dict:
    def refuse(token):
        raise ValueError(f"non-finite number {token} in the output")
    return json.loads(line, parse_constant=refuse)


def test_attack_refused_on_arrival_and_bounded_within_the_bounds(tmp_path, micro_out, head):
    home = make_home(tmp_path, micro_out, None, min_clients=3)
    srv = ServerProcess(home, None).start()
    try:
        a, b, m = (clinic(tmp_path, home, srv.url, name) for name in ("clinic-a", "clinic-b", "mallory"))
        stored = blob_count(home)
        # the attack of the issue: finite but huge values, n = 1e9, no DP noise; every bound named
        path, uid = crafted(tmp_path / "m", head, value=1e30, n=10**9, sigma=0.0)
        out = m.upload(path, uid, 1, 1)
        assert out["status"] == "refused" and out["http"] == 422, out
        for words in ("claimed n = 1000000000 exceeds the federation's cap of 200000",
                      "noise_multiplier = 0 is below the federation's minimum 0.5", "|delta| up to 1e+30 exceeds"):
            assert words in out["reason"], out["reason"]
        for kwargs, words in [({"value": 0.01, "n": 10**9, "sigma": 1.0}, "claimed n"),
                              ({"value": 0.01, "n": 50, "sigma": 0.0}, "noise_multiplier = 0 is below"),
                              ({"value": 1e30, "n": 50, "sigma": 1.0}, "|delta| up to 1e+30")]:
            path, uid = crafted(tmp_path / "m", head, **kwargs)
            out = m.upload(path, uid, 1, 1)
            assert out["http"] == 422 and words in out["reason"] and out["reason"].count(";") == 0, (kwargs, out)
        assert blob_count(home) == stored and rounds(home)[0]["n_updates"] == 0, "nothing of the refused updates stored"

        # within every arrival bound, as large as they allow: stored, and its influence is bounded
        path, uid = crafted(tmp_path / "m", head, value=100.0, n=200_000, sigma=0.5)
        assert m.upload(path, uid, 1, 1)["status"] == "stored"
        for i, (c, folder) in enumerate([(a, "a"), (b, "b")]):
            p, u = write_fake_update(tmp_path / folder, head, i + 1)
            assert c.upload(p, u, 1, 1)["status"] == "stored"
        deadline = time.time() + 60
        while time.time() < deadline and rounds(home)[0]["state"] != "closed":
            time.sleep(0.2)
        r1 = rounds(home)[0]
        assert r1["state"] == "closed" and sorted(r1["report"]["accepted"]) == ["clinic-a", "clinic-b", "mallory"], r1
        c_max = math.sqrt(sum(v.size for v in head.values()))  # update_clip_rms 1.0 x sqrt(parameters)
        assert r1["report"]["clip_ceiling"] == pytest.approx(c_max, rel=1e-5) and r1["report"]["max_weight"] == 0.5
        assert r1["report"]["clip_bound"] <= c_max
        assert all(w["mallory"] <= 0.5 + 1e-6 for w in r1["report"]["weights"].values()), r1["report"]["weights"]
        bundle = a.pull(2)
        with np.load(bundle.path(bundle.manifest["head"]["weights"])) as z:
            new = {k: z[k].astype(np.float64) for k in z.files}
        move = l2_norm({k: new[k] - head[k] for k in head})
        assert move <= r1["report"]["clip_bound"] * (1 + 1e-4), move  # weights sum to 1, each update clipped to C
        proc = edge_run("infer", "--bundle", str(bundle.root), "--state", str(tmp_path / "clinic-a"), "--synthetic",
                        "--case-id", "1", "--case-id", "2", "--json")
        assert proc.returncode == 0, proc.stderr
        assert all(math.isfinite(strict_json(line)["probability"]) for line in proc.stdout.splitlines())
    finally:
        srv.stop()


@pytest.fixture
def loose_server(tmp_path, micro_out):
    """A server with the arrival bounds and the clip ceiling opened wide (as an older server stored
    updates): only the pre-publication check stands between a huge update and the next version."""
    srv = published_server(tmp_path, micro_out / "bundle", min_clients=100, max_n=10**9, min_noise_multiplier=0.0,
                           max_update_abs=1e38, update_clip_rms=1e35, max_client_weight=1.0)
    yield srv
    srv.engine.dispose()


def store(srv: Server, name: str, path: Path, uid: str):
    key = generate_key()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    token, pub = srv.issue_token(name), base64.b64encode(raw).decode()
    body = json.dumps({"token": token, "public_key": pub}).encode()
    srv.enroll(protocol.sign_request(key, name, "POST", "/v1/enroll", body), "POST", "/v1/enroll", body, token, pub)
    hpke = HpkePublic.from_dict(srv.server_identity()["hpke_public"])
    env = codec.seal(path.read_bytes(), key=key, hpke_public=hpke, update_id=uid, clinic=name, round_id=1, base_version=1,
                     kem="x25519")
    return srv.receive_update(name, key.public_key(), env)


def test_huge_aggregate_is_not_published_round_failed_with_the_reason(loose_server, tmp_path):
    srv = loose_server
    head = srv.head_params(1)
    # alone in its round: the lower-median clip bound is its own norm, so only the check before
    # publishing stands between it and the next version
    assert store(srv, "mallory", *crafted(tmp_path / "m", head, value=1e30, n=10**9, sigma=0.0)).status == "stored"
    with srv.engine.begin() as conn:
        conn.execute(db.rounds.update().where(db.rounds.c.id == 1).values(min_clients=1))
    assert rounds_mod.tick(srv) == []
    with srv.engine.connect() as conn:
        r1, r2 = conn.execute(select(db.rounds).order_by(db.rounds.c.id)).all()
    assert r1.state == "failed" and r1.result_version is None
    assert r1.report["error"].startswith("aggregated model refused before publication: ") and "exceeds the bound 1000" in r1.report["error"]
    assert srv.latest_version()["version"] == 1, "nothing published"
    assert r2.state == "open" and r2.base_version == 1


def test_default_server_refuses_the_attack_in_process(tmp_path, micro_out):
    """The same bounds through the server library (no HTTP): Refusal 422, nothing stored."""
    srv = published_server(tmp_path, micro_out / "bundle", min_clients=100)
    try:
        with pytest.raises(Refusal) as err:
            store(srv, "mallory", *crafted(tmp_path / "m", srv.head_params(1), value=1e30, n=10**9, sigma=0.0))
        assert err.value.status == 422 and "claimed n" in err.value.reason
        with srv.engine.connect() as conn:
            assert conn.execute(select(db.updates)).all() == []
        srv.home.save_config(Config(max_client_weight=0.0))
        with pytest.raises(BadInput, match=r"config.json: max_client_weight = 0.0 is out of range \(0, 1\]"):
            Server(srv.home)
    finally:
        srv.engine.dispose()


def _resign_with_head(bundle: Path, key_path: Path, value: float) -> str:
    """Replace the bundle's head.npz by one with every weight ``value``, run it in numpy (as a
    federated version does) and sign the manifest with a new key; the model version."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    name = manifest["head"]["weights"]
    with np.load(bundle / name) as z:
        params = {k: np.full(z[k].shape, value, np.float32) for k in z.files}
    with open(bundle / name, "wb") as f:
        np.savez(f, **params)
    data = (bundle / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest["head"] = {**manifest["head"], "runtime": "numpy"}
    key = generate_key()
    (bundle / MANIFEST).write_text(json.dumps(sign_manifest(manifest, key), indent=2))
    save_public_key(key.public_key(), key_path)
    return str(manifest["model_version"])


def test_infer_json_never_prints_a_non_finite_probability(micro_bundle_copy, tmp_path):
    key = tmp_path / "signer.pub"
    version = _resign_with_head(micro_bundle_copy, key, 1e30)  # finite weights whose scores overflow
    proc = edge_run("infer", "--bundle", str(micro_bundle_copy), "--trusted-key", str(key), "--state", str(tmp_path / "st"),
                    "--synthetic", "--case-id", "1", "--case-id", "2", "--json")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [strict_json(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 2 and all(x["rejected"] for x in lines), lines
    for x in lines:
        assert x["reason"] == f"case-00000{x['case_id']}: the head gives non-finite scores (model {version}, bundle head.npz); case not predicted", x
    assert proc.stderr.strip().splitlines() == ["error: no case could be predicted (2 rejected)"], proc.stderr
    # weights that are not finite themselves are refused when the head is loaded, before any case
    _resign_with_head(micro_bundle_copy, key, np.inf)
    proc = edge_run("infer", "--bundle", str(micro_bundle_copy), "--trusted-key", str(key), "--state", str(tmp_path / "st"),
                    "--synthetic", "--case-id", "1", "--json")
    assert proc.returncode == 2 and proc.stdout == "" and "is not finite" in proc.stderr, (proc.stdout, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1
