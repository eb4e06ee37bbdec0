"""The hospital tier (issue 16): the whole teacher trained federated over the network.

Real parts throughout: `edge-server serve` on 127.0.0.1 in a subprocess (SQLite and PostgreSQL),
hospitals as `edge-export train-round` processes or the same client in-process, the real HPKE,
Tink streaming AEAD, safetensors and Ed25519 signatures; crashes are real SIGKILLs of the server.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from edge_runtime.errors import BadInput, Refused
from edge_runtime.sync import protocol
from tests.server_util import ROOT, ServerProcess

torch = pytest.importorskip("torch")

SITES, CASES, VAL = 3, 24, 8


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory) -> Path:
    from export.hospital import teacher_init

    out = tmp_path_factory.mktemp("teacher") / "init"
    teacher_init(out, config_name="tiny", seed=0, sites=SITES, cases_per_site=CASES)
    return out


def edge_export(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


class Federation:
    """A server home with the teacher published (and, optionally, a head bundle), served on loopback."""

    def __init__(self, root: Path, teacher: Path, db_url: str | None, *, patch: str = "", **config) -> None:
        from server.home import Config, Home
        from server.service import Server
        from server.teacher import publish_teacher

        self.root = root
        self.home = Home(root / "srv")
        self.home.init(Config(db_url=db_url or "", **{"teacher_min_clients": SITES, "teacher_chunk_bytes": 2**18, **config}))
        self.srv = Server(self.home)
        self.version, self.round = publish_teacher(self.srv, teacher)
        self.proc = ServerProcess(self.home.root, None, patch=patch).start()

    @property
    def url(self) -> str:
        return self.proc.url

    def restart(self, patch: str = "") -> None:
        """The server again on the same port (the hospitals' configured URL)."""
        self.proc.stop()
        port = self.proc.port
        self.proc = ServerProcess(self.home.root, None, patch=patch)
        self.proc.port, self.proc.url = port, f"http://127.0.0.1:{port}"
        self.proc.start()

    def hospital(self, name: str):
        from export.hospital import Hospital, enroll

        enroll(self.root / name, self.url, self.srv.issue_token(name, "hospital"))
        return Hospital(self.root / name, retries=1, backoff=0.05, timeout=30)

    def teacher_versions(self) -> list[int]:
        from sqlalchemy import select

        from server import db

        with self.srv.engine.connect() as conn:
            return list(conn.execute(select(db.versions.c.version).where(db.versions.c.federation == "teacher")
                                     .order_by(db.versions.c.version)).scalars())

    def wait_version(self, count: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while len(self.teacher_versions()) < count:
            assert time.time() < deadline, f"no teacher version {count}: {self.proc.log.name}"
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.stop()


@pytest.fixture
def fed(tmp_path, teacher_folder, db_url):
    made = []

    def make(**config) -> Federation:
        made.append(Federation(tmp_path, teacher_folder, db_url, **config))
        return made[-1]

    yield make
    for f in made:
        f.stop()


def random_delta(fed: Federation, seed: int, scale: float = 1e-3) -> dict[str, np.ndarray]:
    from server.teacher import teacher_params

    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in teacher_params(fed.srv, fed.version).items()}


META = {"n": 24, "val_loss": 0.69, "modality_fraction": {"ct": 1.0, "pathology": 0.5, "genomics": 0.5}, "noise_multiplier": 0.0}


def sealed(hospital, fed: Federation, delta: dict, uid: str | None = None) -> Path:
    return hospital.seal(delta, update_id=uid or f"{hospital.name}-t{fed.round}", round_id=fed.round, base_version=fed.version,
                         meta=dict(META))


def signed(hospital, method: str, path: str, body: bytes = b"") -> httpx.Response:
    headers = protocol.sign_request(hospital.client.key, hospital.name, method, path, body)
    return httpx.request(method, hospital.client.url + path, content=body, headers=headers, timeout=30)


def begin_body(side: Path, **override) -> bytes:
    doc = json.loads(side.read_text())
    return json.dumps({**{k: doc[k] for k in ("update_id", "round", "base_version", "kem", "stream_key", "total_size", "meta")},
                       **override}).encode()


# ------------------------------------------------------------------ the simulation is the system


def test_three_hospital_processes_equal_the_simulation(tmp_path, teacher_folder):
    """3 hospital processes x 2 rounds through `edge-server serve` (tiny teacher, no DP, dwfl_mw)
    make the same global parameters as `train-teacher`'s simulation with the same seeds and sites."""
    from export.config import get_config
    from export.federated import FederationSpec, run_federation
    from server.teacher import teacher_params

    fed = Federation(tmp_path, teacher_folder, None)
    try:
        tokens = [fed.srv.issue_token(f"site{k}", "hospital") for k in range(SITES)]
        for k in range(SITES):
            done = edge_export("enroll", "--server", fed.url, "--token", tokens[k], "--state", str(tmp_path / f"h{k}"))
            assert done.returncode == 0, done.stderr
        for rnd in range(2):
            for k in range(SITES):
                args = ["train-round", "--state", str(tmp_path / f"h{k}"), "--synthetic-site", str(k), "--synthetic-sites",
                        str(SITES), "--cases", str(CASES), "--val-cases", str(VAL), "--seed", str(k), "--threads", "2"]
                done = edge_export(*args)
                assert done.returncode == 0, done.stderr[-2000:]
                assert f"stored in round {fed.round + rnd}" in done.stdout
                if rnd == 0 and k == 0:  # a scheduled rerun in the same round does nothing
                    again = edge_export(*args)
                    assert again.returncode == 0 and f"already sent an update for round {fed.round}" in again.stdout
            fed.wait_version(rnd + 2)
        network = teacher_params(fed.srv, fed.teacher_versions()[-1])
        first = teacher_params(fed.srv, fed.version)
    finally:
        fed.stop()
    torch.set_num_threads(2)
    run_federation(tmp_path / "sim", get_config("tiny"), FederationSpec(sites=SITES, rounds=2, cases_per_site=CASES,
                                                                          val_per_site=VAL), seed=0, log=lambda _m: None)
    sim = torch.load(tmp_path / "sim" / "federated.pt", weights_only=True)["model"]
    assert max(float(np.max(np.abs(first[k] - v))) for k, v in network.items()) > 1e-3, "the teacher was trained"
    assert max(float(np.max(np.abs(sim[k].numpy() - v))) for k, v in network.items()) <= 1e-6


# ------------------------------------------------------------------ uploads: resumable, authenticated, checked


def test_resumed_upload_sends_no_acknowledged_chunk_twice_and_aggregates(fed):
    from server.teacher import teacher_params

    f = fed(teacher_min_clients=1, max_client_weight=1.0)  # one hospital's round: theta + delta exactly
    h = f.hospital("north")
    delta = random_delta(f, 1)
    side = sealed(h, f, delta)
    doc = json.loads(side.read_text())
    status = signed(h, "POST", "/v1/teacher/uploads", begin_body(side)).json()
    assert status["chunks"] >= 4 and status["received_chunks"] == 0
    data = side.with_suffix(".sealed").read_bytes()
    size = status["chunk_size"]
    for i in range(2):  # the hospital is killed after two acknowledged chunks
        assert signed(h, "PUT", f"/v1/teacher/uploads/{doc['update_id']}/{i}", data[i * size:(i + 1) * size]).status_code == 200
    from export.hospital import Hospital

    again = Hospital(h.state.root).send_pending()  # the next scheduled run
    assert again[0]["chunks_sent"] == status["chunks"] - 2
    assert again[0]["answer"]["status"] == "stored"
    f.wait_version(2)
    new = teacher_params(f.srv, f.teacher_versions()[-1])
    old = teacher_params(f.srv, f.version)
    assert max(float(np.max(np.abs(new[k] - old[k] - delta[k]))) for k in delta) <= 1e-6  # one hospital: theta + delta


def test_chunks_tampered_replayed_reordered_or_short_are_refused(fed):
    f = fed()
    h = f.hospital("north")
    side = sealed(h, f, random_delta(f, 2))
    uid = json.loads(side.read_text())["update_id"]
    status = signed(h, "POST", "/v1/teacher/uploads", begin_body(side)).json()
    data, size = side.with_suffix(".sealed").read_bytes(), status["chunk_size"]
    path = f"/v1/teacher/uploads/{uid}/0"
    headers = protocol.sign_request(h.client.key, h.name, "PUT", path, data[:size])
    tampered = bytes([data[0] ^ 1]) + data[1:size]
    r = httpx.put(h.client.url + path, content=tampered, headers=headers)
    assert r.status_code == 401 and "signature" in r.json()["error"]
    assert httpx.put(h.client.url + path, content=data[:size], headers=headers).status_code == 200
    replay = httpx.put(h.client.url + path, content=data[:size], headers=headers)
    assert replay.status_code == 401 and "nonce" in replay.json()["error"]
    ahead = signed(h, "PUT", f"/v1/teacher/uploads/{uid}/2", data[2 * size:3 * size])
    assert ahead.status_code == 409 and "send chunk 1" in ahead.json()["error"]
    short = signed(h, "PUT", f"/v1/teacher/uploads/{uid}/1", data[size:2 * size - 1])
    assert short.status_code == 422
    early = signed(h, "POST", f"/v1/teacher/uploads/{uid}/complete", json.dumps({"sha256": "0" * 64}).encode())
    assert early.status_code == 409 and "send the rest" in early.json()["error"]
    assert signed(h, "GET", f"/v1/teacher/uploads/{uid}").json()["received_chunks"] == 1


def test_declared_sizes_that_do_not_fit_the_model_are_refused_before_storing(fed):
    f = fed()
    h = f.hospital("north")
    side = sealed(h, f, random_delta(f, 3))
    huge = signed(h, "POST", "/v1/teacher/uploads", begin_body(side, total_size=2 * 2**30))
    assert huge.status_code == 413
    wrong = signed(h, "POST", "/v1/teacher/uploads", begin_body(side, total_size=10_000))
    assert wrong.status_code == 422 and "does not fit the model" in wrong.json()["error"]
    assert not (f.home.root / "uploads").exists() or not any((f.home.root / "uploads").iterdir()), "nothing stored"
    bad_meta = signed(h, "POST", "/v1/teacher/uploads", begin_body(side, meta={**META, "n": 0}))
    assert bad_meta.status_code == 422


@pytest.mark.parametrize("fault", ["missing", "shape", "nan", "ciphertext", "hash"])
def test_updates_that_do_not_match_or_do_not_open_are_refused_at_completion(fed, fault):
    from sqlalchemy import select

    from server import db

    f = fed(teacher_min_clients=1)
    h = f.hospital("north")
    delta = random_delta(f, 4)
    name = sorted(delta)[0]
    if fault == "missing":
        delta.pop(name)
    elif fault == "shape":
        delta[name] = np.zeros((*delta[name].shape, 2), np.float32)
    elif fault == "nan":
        delta[name].flat[0] = np.nan
    side = sealed(h, f, delta)
    if fault == "ciphertext":
        blob = side.with_suffix(".sealed")
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0x40
        blob.write_bytes(bytes(data))
        doc = json.loads(side.read_text())
        import hashlib

        side.write_text(json.dumps({**doc, "sha256": hashlib.sha256(bytes(data)).hexdigest()}))
    if fault == "hash":
        side.write_text(json.dumps({**json.loads(side.read_text()), "sha256": "0" * 64}))
    with pytest.raises(Refused, match="HTTP 422"):
        h.upload(side)
    with f.srv.engine.connect() as conn:
        assert conn.execute(select(db.updates)).first() is None, "nothing stored"
        assert conn.execute(select(db.uploads)).first() is None, "the upload is discarded: its id may begin again"
    assert f.teacher_versions() == [f.version]


def test_tiers_are_kept_apart(fed, micro_out):
    """A clinic cannot send teacher updates or read teacher versions; a hospital cannot send head
    updates; the two federations run side by side and `edge-server rounds` shows both."""
    from edge_runtime.bundle import default_public_key_path
    from edge_runtime.keys import load_public_key
    from edge_runtime.state import ClinicState
    from edge_runtime.sync.client import Client, enroll

    f = fed()
    head_version, head_round = f.srv.publish_bundle(micro_out / "bundle", load_public_key(default_public_key_path(micro_out / "bundle")))
    h = f.hospital("north")
    clinic_token = f.srv.issue_token("clinic-a", "clinic")
    with pytest.raises(BadInput, match="enrolls a clinic"):
        from export.hospital import enroll as hospital_enroll

        hospital_enroll(f.root / "wrong", f.url, clinic_token)
    enroll(ClinicState(f.root / "clinic"), f.url, clinic_token)
    clinic = Client(ClinicState(f.root / "clinic"))
    side = sealed(h, f, random_delta(f, 5))
    as_clinic = clinic.request("POST", "/v1/teacher/uploads", begin_body(side))
    assert as_clinic.status_code == 403 and "hospital" in as_clinic.json()["error"]
    assert clinic.request("GET", f"/v1/bundle/{f.version}/manifest.json").status_code == 403
    assert clinic.request("GET", "/v1/teacher").status_code == 403
    assert h.client.request("GET", "/v1/model").status_code == 403
    assert h.client.request("GET", f"/v1/bundle/{head_version}/manifest.json").status_code == 403
    env = protocol.Envelope.build(h.client.key, "north-1", "north", head_round, head_version, "x25519", b"x" * 64)
    assert h.client.request("POST", "/v1/updates", env.to_json()).status_code == 403
    assert clinic.get_json("/v1/model")["version"] == head_version
    assert h._json("GET", "/v1/teacher", b"", "teacher")["version"] == f.version
    listing = subprocess.run([sys.executable, "-m", "server.cli", "rounds", "--home", str(f.home.root), "--json"],
                             capture_output=True, text=True, cwd=ROOT)
    assert {r["federation"] for r in json.loads(listing.stdout)} == {"head", "teacher"}


def test_stale_base_is_refused(tmp_path, teacher_folder):
    from server.home import Config, Home
    from server.service import Refusal, Server
    from server.teacher import publish_teacher
    from server.uploads import UploadStart, begin

    home = Home(tmp_path / "srv")
    home.init(Config(teacher_max_staleness=1))
    srv = Server(home)
    v1, r1 = publish_teacher(srv, teacher_folder)
    for _ in range(2):  # two newer rounds
        publish_teacher(srv, teacher_folder)
    from sqlalchemy import insert

    from server import db

    with srv.engine.begin() as conn:
        conn.execute(insert(db.clinics).values(name="north", public_key="00" * 32, enrolled_at=0.0, tier="hospital"))
    req = UploadStart("north-t1", r1, v1, "x25519", {"kem": "x25519", "sealed_keyset": base64.b64encode(b"k").decode()}, 10**6,
                      dict(META))
    with pytest.raises(Refusal, match="too stale"):
        begin(srv, "north", req)


def test_server_killed_mid_chunk_resumes_and_mid_aggregation_is_taken_over(fed):
    """kill -9 after a chunk's bytes are on disk but before they are acknowledged: the client resends
    that chunk only, the server cuts what the crash left; kill -9 while aggregating: after the lease
    another process aggregates the round, once."""
    from server.teacher import teacher_params

    die_after_write = ("import os, server.uploads as U\n_w = U._write_at\n"
                       "def w(path, offset, data):\n    _w(path, offset, data)\n"
                       "    if offset > 0: os.kill(os.getpid(), 9)\nU._write_at = w\n")
    f = fed(teacher_min_clients=1, lease_seconds=1.0, max_client_weight=1.0)
    f.restart(die_after_write)
    h = f.hospital("north")
    delta = random_delta(f, 6)
    side = sealed(h, f, delta)
    with pytest.raises(Refused):
        h.upload(side)
    f.restart(patch=("import os, server.teacher as T\n_t = T.teacher_version\n"
                     "def t(*a, **k):\n    _t(*a, **k)\n    os.kill(os.getpid(), 9)\nT.teacher_version = t\n"))
    from export.hospital import Hospital

    sent = Hospital(h.state.root).send_pending()[0]
    chunks = -(-json.loads(side.read_text() if side.exists() else "{}").get("total_size", sent["total_size"]) // 2**18)
    assert sent["chunks_sent"] == chunks - 1  # chunk 0 was acknowledged before the crash
    deadline = time.time() + 30
    while f.proc.proc.poll() is None:  # the aggregating process dies
        assert time.time() < deadline
        time.sleep(0.1)
    assert f.teacher_versions() == [f.version]
    f.restart()
    f.wait_version(2)
    time.sleep(1.5)  # a second process would have had its chance
    assert len(f.teacher_versions()) == 2, "aggregated exactly once"
    new, old = teacher_params(f.srv, f.teacher_versions()[-1]), teacher_params(f.srv, f.version)
    assert max(float(np.max(np.abs(new[k] - old[k] - delta[k]))) for k in delta) <= 1e-6


def test_disk_full_during_a_chunk_stores_nothing_and_the_upload_resumes(fed):
    full_once = ("import os, errno\n_p = os.pwrite\nstate = {'n': 0}\n"
                 "def p(fd, data, offset):\n    state['n'] += 1\n"
                 "    if state['n'] == 2:\n        _p(fd, bytes(data)[:len(data) // 2], offset)\n"
                 "        raise OSError(errno.ENOSPC, 'No space left on device')\n    return _p(fd, data, offset)\nos.pwrite = p\n")
    f = fed(teacher_min_clients=1)
    f.restart(full_once)
    h = f.hospital("north")
    side = sealed(h, f, random_delta(f, 7))
    with pytest.raises(Refused, match="HTTP 507"):
        h.upload(side)
    uid = json.loads(side.read_text())["update_id"]
    status = signed(h, "GET", f"/v1/teacher/uploads/{uid}").json()
    assert status["received_chunks"] == 1
    assert (f.home.root / "uploads" / f"{uid}.part").stat().st_size == status["received_bytes"], "the half-written chunk is cut off"
    done = h.upload(side)
    assert done["answer"]["status"] == "stored" and done["chunks_sent"] == status["chunks"] - 1


def test_old_databases_gain_the_tier_and_federation_columns(tmp_path):
    from sqlalchemy import create_engine, inspect, text

    from server import db

    engine = create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    with engine.begin() as conn:  # the schema as the previous release made it
        conn.execute(text("CREATE TABLE clinics (name VARCHAR(64) PRIMARY KEY, public_key VARCHAR(64) NOT NULL, "
                          "enrolled_at FLOAT NOT NULL, revoked_at FLOAT)"))
        conn.execute(text("INSERT INTO clinics VALUES ('old-clinic', 'ab', 1.0, NULL)"))
    db.create_all(engine)
    assert {c["name"] for c in inspect(engine).get_columns("clinics")} >= {"tier"}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT tier FROM clinics")).scalar_one() == "clinic"
    db.create_all(engine)  # idempotent


def test_pipeline_teacher_stage_takes_the_network_teacher(tmp_path):
    """`pipeline --teacher-state`'s first stage: the federation's teacher (a version folder and a
    hospital's own normalisation layers) becomes WORK/teacher with the federation's preprocessing;
    a teacher of another config is refused before any work."""
    from safetensors.torch import save_file

    from export.config import get_config
    from export.hospital import global_teacher, teacher_init
    from export.stages import PREPROCESSING, load_teacher, network_teacher_stage
    from export.work import Identity, Work

    folder = tmp_path / "v1"
    teacher_init(folder, config_name="micro", seed=3, sites=2, cases_per_site=8)
    (folder / "manifest.json").write_text(json.dumps({"model_version": "teacher-micro-test"}))
    model, spec, cfg, _ = global_teacher(folder, None)
    own = {k: v + 0.5 for k, v in model.state_dict().items() if k in spec.local_tensors and v.dtype.is_floating_point}
    save_file({k: v.contiguous() for k, v in own.items()}, str(tmp_path / "r2.safetensors"))
    work = Work(tmp_path / "work", Identity.of(get_config("micro"), 0))
    record = network_teacher_stage(work, get_config("micro"), folder=folder, norms=tmp_path / "r2.safetensors", log=lambda _m: None)
    assert 0.0 <= record["facts"]["test_auc"] <= 1.0
    loaded = load_teacher(work, get_config("micro")).state_dict()
    name = sorted(own)[0]
    assert torch.equal(loaded[name], own[name]), "the hospital's own normalisation layers"
    assert json.loads(work.path(PREPROCESSING).read_text()) == spec.preprocessing
    with pytest.raises(BadInput, match="this pipeline runs --config tiny"):
        network_teacher_stage(Work(tmp_path / "w2", Identity.of(get_config("tiny"), 0)), get_config("tiny"), folder=folder,
                              norms=None, log=lambda _m: None)


def test_hospital_dp_charges_the_ledger_before_release_and_refuses_past_the_budget(fed):
    """`train-round --dp`: each round planned inside the lifetime budget and charged (fsynced) to
    the hospital's ledger before training; the update carries the coarsened sigma; once the budget
    is spent the round is refused with nothing trained and nothing sent."""
    from export.hospital import SyntheticSite, train_round
    from export.hospital_dp import DPOptions

    f = fed(teacher_min_clients=1)
    from export.hospital import enroll

    enroll(f.root / "north", f.url, f.srv.issue_token("north", "hospital"))
    data = SyntheticSite(0, SITES, 0, CASES, VAL)
    opts = DPOptions(epsilon_total=0.5)  # the first round plans the whole budget in
    first = train_round(f.root / "north", data, dp=opts, seed=0, log=lambda _m: None)
    assert first["status"] == "sent" and first["privacy"]["rounds"] == 1
    assert 0.45 < first["privacy"]["epsilon_spent"] <= 0.5 + 1e-6
    with f.srv.engine.connect() as conn:
        from sqlalchemy import select

        from server import db

        meta = conn.execute(select(db.updates.c.meta)).scalar_one()
    assert 0.5 <= meta["noise_multiplier"] <= first["privacy"]["noise_multiplier"]
    f.wait_version(2)
    ledger = (f.root / "north" / "privacy" / "teacher" / "ledger.jsonl").read_text().splitlines()
    assert len(ledger) == 1
    with pytest.raises(Refused, match="budget"):
        train_round(f.root / "north", data, dp=opts, seed=0, log=lambda _m: None)
    assert (f.root / "north" / "privacy" / "teacher" / "ledger.jsonl").read_text().splitlines() == ledger, "nothing charged"
    assert not list((f.root / "north" / "teacher" / "outbox").iterdir()), "nothing sent"
    assert len(f.teacher_versions()) == 2


def test_an_abandoned_upload_is_discarded_once_its_round_is_past_staleness(tmp_path, teacher_folder):
    from sqlalchemy import insert, select

    from federation.teacher import sealed_size_bounds
    from server import db
    from server.home import Config, Home
    from server.service import Server
    from server.teacher import publish_teacher, teacher_shapes
    from server.uploads import UploadStart, begin, chunk, part_path

    home = Home(tmp_path / "srv")
    home.init(Config(teacher_max_staleness=1, teacher_chunk_bytes=2**16))
    srv = Server(home)
    v1, r1 = publish_teacher(srv, teacher_folder)
    with srv.engine.begin() as conn:
        conn.execute(insert(db.clinics).values(name="north", public_key="00" * 32, enrolled_at=0.0, tier="hospital"))
    key = {"kem": "x25519", "sealed_keyset": base64.b64encode(b"k").decode()}
    size = sealed_size_bounds(teacher_shapes(srv, v1))[0]
    begin(srv, "north", UploadStart("north-t1", r1, v1, "x25519", key, size, dict(META)))
    chunk(srv, "north", "north-t1", 0, b"\0" * 2**16)
    assert part_path(srv, "north-t1").stat().st_size == 2**16
    for _ in range(2):
        v, r = publish_teacher(srv, teacher_folder)
    begin(srv, "north", UploadStart(f"north-t{r}", r, v, "x25519", key, size, dict(META)))
    with srv.engine.connect() as conn:
        assert [row.upload_id for row in conn.execute(select(db.uploads))] == [f"north-t{r}"]
    assert not part_path(srv, "north-t1").exists()
