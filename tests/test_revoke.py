"""Issue 14 item 4: revoking a clinic takes its stored update out of the round not yet aggregated,
records it, and an aggregation running at that moment does not publish a model that counts it.

Live: a real `edge-server serve`, clinics through the client library, revocation through the CLI.
In process: the same Server and rounds code, with the revocation made at the one moment a live run
cannot aim at (the round claimed and its updates read, the result not yet published)."""

from __future__ import annotations

import base64
import json
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime.keys import generate_key
from edge_runtime.sync import protocol
from edge_runtime.sync import update as codec
from server import rounds as rounds_mod
from server.home import Home
from server.service import Server, raw_public

from .server_util import ServerProcess, edge_server, write_fake_update
from .test_server import clinic, head, make_home, rounds  # noqa: F401 - fixtures


def wait_for(predicate, timeout: float = 30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not reached in time")


def test_revoked_clinic_no_longer_counts_in_the_open_round(tmp_path, micro_out, db_url, head):  # noqa: F811
    home = make_home(tmp_path, micro_out, db_url, min_clients=2)
    srv = ServerProcess(home, None).start()
    try:
        a, b, c = (clinic(tmp_path, home, srv.url, name) for name in ("clinic-a", "clinic-b", "clinic-c"))
        pa, uida = write_fake_update(tmp_path / "a", head, 1, n=500)
        assert a.upload(pa, uida, 1, 1)["status"] == "stored"
        proc = edge_server("revoke", "--home", str(home), "--clinic", "clinic-a")
        assert proc.returncode == 0 and f"dropped from round 1: {uida}" in proc.stdout, (proc.stdout, proc.stderr)
        (r1,) = rounds(home)
        assert r1["state"] == "open" and r1["n_updates"] == 0 and r1["arrivals"] == []
        (drop,) = r1["dropped"]
        assert drop["update_id"] == uida and drop["clinic"] == "clinic-a" and drop["reason"] == "clinic revoked"
        assert "@" in drop["dropped_by"] and drop["dropped_at"] > 0

        pb, uidb = write_fake_update(tmp_path / "b", head, 2)
        pc, uidc = write_fake_update(tmp_path / "c", head, 3)
        assert b.upload(pb, uidb, 1, 1)["status"] == "stored"  # with clinic-a still counted this would close the round
        assert rounds(home)[0]["state"] == "open"
        assert c.upload(pc, uidc, 1, 1)["status"] == "stored"
        closed = wait_for(lambda: (rs := rounds(home)) and rs[0]["state"] == "closed" and rs[0])
        assert closed["n_updates"] == 2 and sorted(x["update_id"] for x in closed["arrivals"]) == sorted([uidb, uidc])
        assert sorted(closed["report"]["accepted"]) == ["clinic-b", "clinic-c"]
        assert set(closed["report"]["weights"]["shared"]) == {"clinic-b", "clinic-c"}
        assert [d["update_id"] for d in closed["dropped"]] == [uida]  # still on the record after the close
        bundle = b.pull(2)
        assert sorted(bundle.manifest["federation"]["clients"]) == ["clinic-b", "clinic-c"]
        assert set(bundle.manifest["federation"]["weights"]) == {"clinic-b", "clinic-c"}
        text = edge_server("rounds", "--home", str(home)).stdout
        assert f"dropped {uida} (clinic revoked, by" in text, text
    finally:
        srv.stop()


class RevokeMidway(Server):
    """Revokes `victim` the first time the aggregation loads its base manifest: after it read the
    round's updates, before it publishes."""

    victim: str | None = None

    def manifest(self, version: int) -> dict:
        if self.victim is not None:
            victim, self.victim = self.victim, None
            self.revoked = self.revoke(victim, by="test@here")
        return super().manifest(version)


def enroll_and_upload(srv: Server, tmp_path, head, name: str, seed: int) -> str:
    key = generate_key()
    token = srv.issue_token(name)
    pub = base64.b64encode(raw_public(key.public_key())).decode()
    body = json.dumps({"token": token, "public_key": pub}).encode()
    srv.enroll(protocol.sign_request(key, name, "POST", "/v1/enroll", body), "POST", "/v1/enroll", body, token, pub)
    path, uid = write_fake_update(tmp_path / name, head, seed)
    env = codec.seal(path.read_bytes(), key=key, hpke_public=srv.hpke_public, update_id=uid, clinic=name, round_id=1,
                     base_version=1, kem="x25519")
    pub_key = Ed25519PublicKey.from_public_bytes(base64.b64decode(pub))
    assert srv.receive_update(name, pub_key, env).status == "stored"
    return uid


def test_revocation_while_the_round_is_being_aggregated(tmp_path, micro_out, head):  # noqa: F811
    home = make_home(tmp_path, micro_out, None, min_clients=2)
    srv = RevokeMidway(Home(home))
    uids = {name: enroll_and_upload(srv, tmp_path, head, name, seed) for seed, name in enumerate(["clinic-a", "clinic-b", "clinic-c"])}
    assert rounds_mod.claim(srv, 1)
    srv.victim = "clinic-b"
    assert rounds_mod.aggregate_round(srv, 1) is None  # it had read clinic-b's update: nothing published
    assert srv.revoked.dropped == {1: [uids["clinic-b"]]}  # taken out although the round was being aggregated
    (r1,) = srv.rounds_report()
    assert r1["state"] == "open" and r1["claimed_by"] is None and r1["n_updates"] == 2 and r1["result_version"] is None
    assert [d["update_id"] for d in r1["dropped"]] == [uids["clinic-b"]] and r1["dropped"][0]["dropped_by"] == "test@here"
    assert srv.latest_version()["version"] == 1

    assert rounds_mod.tick(srv) == [2]  # still due (2 of 2): aggregated again, without clinic-b
    r1 = srv.rounds_report()[0]
    assert r1["state"] == "closed" and set(r1["report"]["weights"]["shared"]) == {"clinic-a", "clinic-c"}
    assert sorted(srv.manifest(2)["federation"]["clients"]) == ["clinic-a", "clinic-c"]
    # a revocation after the aggregation changes nothing that was published, and drops nothing
    assert srv.revoke("clinic-a").dropped == {}
    assert sorted(a["clinic"] for a in srv.rounds_report()[0]["arrivals"]) == ["clinic-a", "clinic-c"]
    assert srv.revoke("clinic-a") is None  # already revoked
