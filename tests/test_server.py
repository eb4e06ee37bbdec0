"""The aggregation server against every bad input and a kill -9, on SQLite and PostgreSQL.

A real `edge-server serve` (uvicorn) on 127.0.0.1; clinics use the real client library
(edge_runtime.sync.client) and the clinic's own update writer. Updates here carry random deltas
(fine-tuning itself is exercised end to end in test_sync_e2e)."""

from __future__ import annotations

import base64
import json
import re
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from edge_runtime.errors import Refused
from edge_runtime.keys import generate_key
from edge_runtime.sync import protocol
from edge_runtime.sync import update as codec
from edge_runtime.sync.client import Client, enroll

from server import rounds as rounds_mod
from server.home import Home
from server.service import Server

from .server_util import (
    ServerProcess,
    edge_server,
    write_fake_update,
)


@pytest.fixture
def head(micro_out):
    with np.load(micro_out / "bundle" / "head.npz") as z:
        return {k: z[k] for k in z.files}


def make_home(tmp_path, micro_out, db_url, min_clients=3, lease=600.0):
    home = tmp_path / "srv"
    args = ["init", "--home", str(home), "--min-clients", str(min_clients), "--lease-seconds", str(lease), "--round-seconds", "3600"]
    proc = edge_server(*args, *(["--db", db_url] if db_url else []))
    assert proc.returncode == 0, proc.stderr
    for name in ("server_ed25519.pem", "hpke.json"):
        assert (home / "keys" / name).stat().st_mode & 0o777 == 0o600
    proc = edge_server("publish", "--home", str(home), str(micro_out / "bundle"))
    assert proc.returncode == 0 and "round 1 open" in proc.stdout, proc.stderr
    return home


def clinic(tmp_path, home, url, name, kem="mlkem768-x25519") -> Client:
    token = edge_server("token", "--home", str(home), "--clinic", name).stdout.strip()
    enroll(tmp_path / name, url, token, kem)
    return Client(tmp_path / name, retries=0, backoff=0.05, timeout=20)


def rounds(home) -> list[dict]:
    proc = edge_server("rounds", "--home", str(home), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def blob_count(home) -> int:
    return sum(1 for p in (home / "blobs").rglob("*") if p.is_file())


def post(c: Client, path: str, body: bytes, **sign) -> httpx.Response:
    headers = {**protocol.sign_request(c.key, c.config.clinic, "POST", path, body, **sign), "Content-Type": "application/json"}
    return c.http.post(path, content=body, headers=headers)


def envelope(c: Client, path, update_id, round_id=1, base=1, tamper=False) -> protocol.Envelope:
    env = codec.seal(path.read_bytes(), key=c.key, hpke_public=c.hpke, update_id=update_id, clinic=c.config.clinic,
                     round_id=round_id, base_version=base, kem=c.config.kem)
    if not tamper:
        return env
    sealed = bytearray(env.sealed_bytes())
    sealed[-20] ^= 0x01  # re-signed by the clinic: only the ciphertext is wrong
    return protocol.Envelope.build(c.key, update_id, c.config.clinic, round_id, base, c.config.kem, bytes(sealed))


def test_bad_inputs_refused_nothing_stored(tmp_path, micro_out, db_url, head):
    home = make_home(tmp_path, micro_out, db_url)
    srv = ServerProcess(home, None).start()
    try:
        a, b = clinic(tmp_path, home, srv.url, "clinic-a"), clinic(tmp_path, home, srv.url, "clinic-b", kem="x25519")
        good, uid = write_fake_update(tmp_path / "a", head, 1)
        assert a.upload(good, uid, 1, 1)["status"] == "stored"
        assert a.upload(good, uid, 1, 1)["status"] == "already have it"  # a retry after a timeout
        stored = blob_count(home)
        outcomes = {}

        def refused(name, resp, status, words):
            outcomes[name] = (resp.status_code, resp.json().get("error", resp.text))
            assert resp.status_code == status, (name, resp.status_code, resp.text)
            assert words in outcomes[name][1], (name, outcomes[name])

        # the very same request sent again (same nonce): a replay
        body = envelope(a, good, uid).to_json()
        headers = {**protocol.sign_request(a.key, "clinic-a", "POST", "/v1/updates", body), "Content-Type": "application/json"}
        a.http.post("/v1/updates", content=body, headers=headers)
        refused("replayed request", a.http.post("/v1/updates", content=body, headers=headers), 401, "reused nonce")
        p2, uid2 = write_fake_update(tmp_path / "a", head, 2)
        refused("second update same round", post(a, "/v1/updates", envelope(a, p2, uid2).to_json()), 409, "already sent an update")
        pb, uidb = write_fake_update(tmp_path / "b", head, 3)
        refused("tampered ciphertext (re-signed)", post(b, "/v1/updates", envelope(b, pb, uidb, tamper=True).to_json()), 422, "does not open")
        env = envelope(b, pb, uidb)
        forged = replace(env, sealed=base64.b64encode(bytes([env.sealed_bytes()[0] ^ 1]) + env.sealed_bytes()[1:]).decode())
        refused("tampered ciphertext (signature kept)", post(b, "/v1/updates", forged.to_json()), 401, "update signature")
        refused("ciphertext moved to another update id", post(b, "/v1/updates", replace(envelope(b, pb, uidb), update_id="other-id").to_json()),
                401, "update signature")
        refused("unknown round", post(b, "/v1/updates", envelope(b, pb, uidb, round_id=99).to_json()), 404, "unknown round")
        refused("wrong base version", post(b, "/v1/updates", envelope(b, pb, uidb, base=7).to_json()), 409, "based on version")
        for name, mutate, words in [
            ("wrong shape", lambda d: {**d, "classifier.weight": np.zeros((3, 3), np.float32)}, "wrong shape"),
            ("NaN", lambda d: {**d, "classifier.bias": np.full_like(d["classifier.bias"], np.nan)}, "non-finite"),
            ("missing parameter", lambda d: {k: v for k, v in d.items() if k != "classifier.bias"}, "names differ"),
        ]:
            pbad, uidbad = write_fake_update(tmp_path / "b", head, 4, mutate=mutate)
            refused(name, post(b, "/v1/updates", envelope(b, pbad, uidbad).to_json()), 422, words)
        refused("not an npz", post(b, "/v1/updates", envelope(b, tmp_path / "srv" / "config.json", "u-junk").to_json()), 422, "readable .npz")
        refused("malformed JSON", post(b, "/v1/updates", b'{"update_id": "x", '), 422, "malformed request body")
        refused("JSON of the wrong shape", post(b, "/v1/updates", b'{"update_id": 5}'), 422, "malformed request body")
        refused("oversized body", post(b, "/v1/updates", b"x" * (16 * 2**20 + 1)), 413, "larger than")
        refused("stale timestamp", post(b, "/v1/updates", envelope(b, pb, uidb).to_json(), now=time.time() - 3600), 401, "stale timestamp")
        other = generate_key()
        h = protocol.sign_request(other, "clinic-b", "GET", "/v1/model", b"")
        refused("bad signature", b.http.get("/v1/model", headers=h), 401, "bad request signature")
        refused("unknown clinic", b.http.get("/v1/model", headers=protocol.sign_request(other, "nobody", "GET", "/v1/model", b"")), 401, "unknown clinic")
        refused("unsigned request", b.http.get("/v1/model"), 401, "not signed")
        refused("envelope for another clinic", post(b, "/v1/updates", envelope(a, p2, uid2).to_json()), 403, "another clinic")
        token = edge_server("token", "--home", str(home), "--clinic", "clinic-c").stdout.strip()
        enroll(tmp_path / "c", srv.url, token)
        with pytest.raises(Refused, match="already used token"):
            enroll(tmp_path / "c2", srv.url, token)
        with pytest.raises(Refused, match="another server key"):
            enroll(tmp_path / "c3", srv.url, token[:-64] + "0" * 64)
        assert edge_server("revoke", "--home", str(home), "--clinic", "clinic-b").returncode == 0
        refused("revoked clinic", post(b, "/v1/updates", envelope(b, pb, uidb).to_json()), 403, "revoked")

        assert blob_count(home) == stored  # nothing of the refused requests was stored
        log = Path(srv.log.name).read_text()  # one line per record: request id, clinic, round
        assert re.search(rf"INFO server.service req=[0-9a-f]{{12}} clinic=clinic-a round=1 stored update {uid}", log), log[-2000:]
        assert re.search(r"INFO server.app req=[0-9a-f]{12} clinic=clinic-b round=- refused POST /v1/updates: 422", log), log[-2000:]
        assert "Traceback" not in log
        (r1,) = rounds(home)
        assert r1["state"] == "open" and [x["update_id"] for x in r1["arrivals"]] == [uid] and r1["n_updates"] == 1
        (tmp_path / "attacks.json").write_text(json.dumps(outcomes, indent=1))
        print(json.dumps(outcomes, indent=1))
    finally:
        srv.stop()


CRASH_AFTER_BLOB = "import os, server.blobs as b\nf = b.BlobStore.put\nb.BlobStore.put = lambda self, data: (f(self, data), os._exit(9))[0]"
ARM_SERVER = "import tests.crashpoints as _c; _c.arm('server')"
NEW_VERSION_BLOB = "publish:rename-done:"  # a named crash point: the new version's first blob is on disk


def test_kill9_during_upload_and_during_aggregation(tmp_path, micro_out, db_url, head):
    home = make_home(tmp_path, micro_out, db_url, min_clients=2, lease=1.0)
    srv = ServerProcess(home, None)
    srv.start(CRASH_AFTER_BLOB)  # dies (exit 9, no cleanup) right after the sealed blob is on disk
    try:
        a, b = clinic(tmp_path, home, srv.url, "clinic-a"), clinic(tmp_path, home, srv.url, "clinic-b")
        pa, uida = write_fake_update(tmp_path / "a", head, 1)
        with pytest.raises(Refused, match="unreachable"):
            a.upload(pa, uida, 1, 1)
        assert srv.wait_exit() == 9
        assert rounds(home)[0]["n_updates"] == 0
        srv.start(ARM_SERVER, env={"DWFL_CRASH_AT": NEW_VERSION_BLOB})  # now dies in the middle of aggregating
        assert a.upload(pa, uida, 1, 1)["status"] == "stored"  # the client's retry
        assert a.upload(pa, uida, 1, 1)["status"] == "already have it"
        pb, uidb = write_fake_update(tmp_path / "b", head, 2)
        assert b.upload(pb, uidb, 1, 1)["status"] == "stored"  # min_clients reached: aggregation starts, crashes
        assert srv.wait_exit() == -9
        (r1,) = rounds(home)
        assert r1["state"] == "aggregating" and r1["n_updates"] == 2
        srv.start("")  # restart: the stale claim (lease 1 s) is taken over, the round aggregates once
        deadline = time.time() + 30
        while time.time() < deadline and rounds(home)[0]["state"] != "closed":
            time.sleep(0.3)
        assert rounds_mod.tick(Server(Home(home), db_url)) == [], "a closed round never aggregates again"
        rs = rounds(home)
        assert [r["state"] for r in rs] == ["closed", "open"] and rs[0]["result_version"] == 2 and rs[1]["base_version"] == 2
        assert sorted(x["update_id"] for x in rs[0]["arrivals"]) == sorted([uida, uidb])
        assert sorted(rs[0]["report"]["accepted"]) == ["clinic-a", "clinic-b"]
        assert sum(rs[0]["report"]["weights"]["shared"].values()) == pytest.approx(1.0, abs=1e-5)
        status = a.get_json("/v1/model")
        assert status["version"] == 2 and status["round"]["id"] == 2
        bundle = a.pull(2)  # verified with the pinned server key
        assert bundle.manifest["head"]["runtime"] == "numpy" and bundle.manifest["federation"]["round"] == 1
    finally:
        srv.stop()


def test_one_aggregator_per_round(tmp_path, micro_out, db_url, head):
    """Two server processes' claims on one round: exactly one wins (atomic UPDATE ... WHERE state='open')."""
    from server import db

    home = make_home(tmp_path, micro_out, db_url, min_clients=1)
    s1, s2 = Server(Home(home)), Server(Home(home))
    wins = [rounds_mod.claim(s1, 1), rounds_mod.claim(s2, 1), rounds_mod.claim(s1, 1)]
    assert wins == [True, False, False]
    with s1.engine.connect() as conn:
        assert conn.execute(select(db.rounds.c.state).where(db.rounds.c.id == 1)).scalar_one() == "aggregating"
