"""Fuzzing the server's HTTP bodies on a real `edge-server serve` (uvicorn on 127.0.0.1).

Layer by layer, each reached with valid outer layers so the fuzzed one is really parsed: raw bytes
to every endpoint (no signature); JSON of any shape, correctly signed by an enrolled clinic; envelopes
with any field values, correctly signed; sealed payloads of any bytes, correctly sealed; updates
whose npz bytes or metadata are damaged, correctly sealed and signed. The answer must always be a
clean refusal (4xx with a JSON reason) or a genuine acceptance, never a server error; at the end the
server still serves and stored only what it accepted.
"""

from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from edge_runtime.sync import protocol
from edge_runtime.sync import update as codec
from edge_runtime.sync.client import Client, enroll
from server import db
from server.home import Home

from .server_util import ServerProcess, edge_server

SETTINGS = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")), deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CLINICS = 4  # more are enrolled as damaged-but-valid updates use them up (one update per clinic and round)
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
                           max_leaves=12)


class Fuzzed:
    """The live server, its enrolled clinics (one is retired each time an update is accepted: a
    clinic sends one update per round; another is enrolled when none is left) and what was accepted."""

    def __init__(self, home, root, srv, head) -> None:
        self.home, self.root, self.srv, self.head = home, root, srv, head
        self.accepted: list[str] = []
        self.n = self.ids = self.enrolled = 0  # requests sent, update ids made, clinics enrolled
        self.clinics: list[Client] = []
        for _ in range(CLINICS):
            self.enroll_one()

    @property
    def clinic(self) -> Client:
        return self.clinics[0]

    def post(self, path: str, body: bytes, sign: bool = True):
        self.n += 1
        c = self.clinic
        headers = {"Content-Type": "application/json"}
        if sign:
            headers.update(protocol.sign_request(c.key, c.config.clinic, "POST", path, body))
        resp = c.http.post(path, content=body, headers=headers)
        assert resp.status_code < 500, (resp.status_code, resp.text[:300])
        if resp.status_code != 200:
            assert resp.status_code >= 400 and isinstance(resp.json().get("error"), str), resp.text[:300]
        return resp

    def next_id(self, prefix: str) -> str:
        self.ids += 1
        return f"{prefix}-{self.ids}"

    def send_update(self, plain: bytes, update_id: str) -> int:
        c = self.clinic
        env = codec.seal(plain, key=c.key, hpke_public=c.hpke, update_id=update_id, clinic=c.config.clinic, round_id=1,
                         base_version=1, kem=c.config.kem)
        resp = self.post("/v1/updates", env.to_json())
        if resp.status_code == 200:  # a damaged update that is still a valid one: this clinic is done for the round
            self.accepted.append(update_id)
            self.clinics.pop(0)
            if not self.clinics:
                self.enroll_one()
        return resp.status_code

    def enroll_one(self) -> None:
        from server.service import Server

        name = f"fuzz-{self.enrolled}"
        self.enrolled += 1
        lib = Server(Home(self.home))
        try:
            enroll(self.root / name, self.srv.url, lib.issue_token(name), "x25519")
        finally:
            lib.engine.dispose()
        self.clinics.append(Client(self.root / name, retries=0, timeout=20))


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, micro_out):
    root = tmp_path_factory.mktemp("fuzz-http")
    home = root / "home"
    assert edge_server("init", "--home", str(home), "--min-clients", "100000", "--round-seconds", "86400").returncode == 0
    assert edge_server("publish", "--home", str(home), str(micro_out / "bundle")).returncode == 0
    srv = ServerProcess(home, None).start()
    with np.load(micro_out / "bundle" / "head.npz") as z:
        head = {k: z[k] for k in z.files}
    f = Fuzzed(home, root, srv, head)
    yield f
    try:  # still serving, and only what was accepted is stored
        assert f.clinic.get_json("/v1/model")["version"] == 1
        engine = db.make_engine(Home(home).db_url(None))
        with engine.connect() as conn:
            ids = sorted(r.update_id for r in conn.execute(select(db.updates)))
            n_round = conn.execute(select(db.rounds.c.n_updates).where(db.rounds.c.id == 1)).scalar_one()
            assert conn.execute(select(func.count()).select_from(db.versions)).scalar_one() == 1
        engine.dispose()
        assert ids == sorted(f.accepted) and n_round == len(ids), (ids, f.accepted)
        print(f"HTTP fuzz: {f.n} requests, {len(f.accepted)} damaged updates were still valid and accepted, {f.enrolled} clinics")
    finally:
        srv.stop()


def update_bytes(head: dict, meta: dict, update_id: str) -> bytes:
    return codec.encode({k: np.zeros_like(v, dtype=np.float32) for k, v in head.items()}, {"update_id": update_id, **meta})


GOOD_META = {"n": 50, "val_loss": 0.6, "modality_fraction": {"ct": 1.0, "pathology": 0.5, "genomics": 0.5}, "noise_multiplier": 1.0}


@SETTINGS
@given(path=st.sampled_from(["/v1/enroll", "/v1/updates"]), body=st.binary(max_size=600), sign=st.booleans())
def test_fuzz_raw_bodies(fuzzed, path, body, sign):
    fuzzed.post(path, body, sign=sign)


@SETTINGS
@given(doc=json_values, path=st.sampled_from(["/v1/enroll", "/v1/updates"]))
def test_fuzz_json_bodies_signed(fuzzed, doc, path):
    assert fuzzed.post(path, json.dumps(doc).encode()).status_code != 200


@SETTINGS
@given(fields=st.fixed_dictionaries({
    "update_id": st.text(max_size=140), "round": st.integers(-5, 2**40), "base_version": st.integers(-5, 2**40),
    "kem": st.sampled_from(["x25519", "mlkem768-x25519", "rsa", ""]),
    "sealed": st.one_of(st.text(max_size=200), st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode()))}))
def test_fuzz_envelopes_signed_by_the_clinic(fuzzed, fields):
    c = fuzzed.clinic
    env = protocol.Envelope(fields["update_id"], c.config.clinic, fields["round"], fields["base_version"], fields["kem"],
                            fields["sealed"], "")
    try:
        env = replace(env, signature=base64.b64encode(c.key.sign(env.signed_bytes())).decode())
    except (ValueError, TypeError, AttributeError):  # not base64: cannot be signed; sent as it is
        env = replace(env, signature="AAAA")
    assert fuzzed.post("/v1/updates", env.to_json()).status_code != 200


@settings(SETTINGS, max_examples=min(SETTINGS.max_examples, 40))
@given(plain=st.binary(max_size=3000))
def test_fuzz_sealed_payloads(fuzzed, plain):
    assert fuzzed.send_update(plain, fuzzed.next_id("raw")) in (200, 409, 422)


@SETTINGS
@given(cuts=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=8),
       truncate=st.one_of(st.none(), st.integers(0, 1 << 16)))
def test_fuzz_damaged_update_npz(fuzzed, cuts, truncate):
    uid = fuzzed.next_id("npz")
    buf = bytearray(update_bytes(fuzzed.head, GOOD_META, uid))
    for pos, val in cuts:
        buf[pos % len(buf)] = val
    if truncate is not None:
        del buf[truncate % len(buf):]
    assert fuzzed.send_update(bytes(buf), uid) in (200, 409, 422)


@SETTINGS
@given(meta=st.dictionaries(st.sampled_from(["n", "val_loss", "modality_fraction", "noise_multiplier", "update_id"]), json_values,
                            max_size=5))
def test_fuzz_update_metadata(fuzzed, meta):
    uid = fuzzed.next_id("meta")
    assert fuzzed.send_update(update_bytes(fuzzed.head, meta, uid), uid) in (200, 409, 422)


def test_update_member_that_is_not_an_array_is_refused(fuzzed):
    """Found by atheris (benchmarks/fuzz_atheris.py): an npz member not named .npy loads as raw
    bytes; the server answered 500 before it checked the type."""
    import zipfile

    uid = fuzzed.next_id("raw-member")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k in fuzzed.head:
            zf.writestr(f"{codec.DELTA_PREFIX}{k}", b"not an array")
        zf.writestr(codec.META, json.dumps({"update_id": uid, **GOOD_META}).encode())
    resp_status = fuzzed.send_update(buf.getvalue(), uid)
    assert resp_status == 422
