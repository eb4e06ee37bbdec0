"""Server operations without HTTP (the server library, a real SQLite database and blob store): the
configuration refuses unknown keys; updates arrive with their summary stored, aggregation opens
each once with a fixed number of queries; an update that cannot be opened at aggregation is
rejected with its reason; a round that cannot be aggregated at all is closed as failed, not retried."""

from __future__ import annotations

import base64
import json
import shutil

import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy import event, select

from edge_runtime.errors import BadInput
from edge_runtime.keys import generate_key
from edge_runtime.sync import protocol
from edge_runtime.sync import update as codec
from edge_runtime.sync.hpke import HpkePublic
from server import db, rounds
from server.home import Config
from server.service import Server

from .server_util import edge_server, published_server, write_fake_update


def test_unknown_config_key_refused_at_start(tmp_path):
    home = tmp_path / "srv"
    assert edge_server("init", "--home", str(home)).returncode == 0
    doc = json.loads((home / "config.json").read_text())
    (home / "config.json").write_text(json.dumps({**doc, "min_client": 1, "betta": 0.5}))
    proc = edge_server("token", "--home", str(home), "--clinic", "north")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(home / "config.json") in lines[0] and "'betta', 'min_client'" in lines[0], proc.stderr
    with pytest.raises(BadInput, match="unknown configuration key"):
        Config.from_dict({"db_url": "", "typo": 1})
    assert Config.from_dict({"min_clients": 7}).min_clients == 7


@pytest.mark.parametrize("key, value, says", [("beta", "0.3", "must be float"), ("body_reads", "4", "must be int"),
                                              ("beta", 2.0, "out of range"), ("min_clients", True, "must be int"),
                                              ("strategy", "dwfl_typo", "not one the server offers"),
                                              ("strategy", "fedadam", "not one the server offers"),  # breaks the influence bound
                                              ("strategy_options", [1], "must be dict"),
                                              ("strategy_options", {"beta": 0.9}, "set by the key 'beta'"),
                                              ("strategy_options", {"server_lr": 100.0}, "server_lr = 100.0 must be a number in [1e-06, 1]"),
                                              ("strategy_options", {"clip_factor": 0.0}, "clip_factor"),
                                              ("strategy_options", {"eta": -1.0}, "eta"), ("strategy_options", {"q": 5.0}, "no setting q"),
                                              ("strategy_options", {"typo": 1.0}, "not settable on the server")])
def test_config_value_of_the_wrong_kind_or_range_refused_in_one_line(tmp_path, key, value, says):
    """Review finding: "beta": "0.3" crashed every edge-server command with a TypeError traceback."""
    home = tmp_path / "srv"
    assert edge_server("init", "--home", str(home)).returncode == 0
    doc = json.loads((home / "config.json").read_text())
    (home / "config.json").write_text(json.dumps({**doc, key: value}))
    proc = edge_server("token", "--home", str(home), "--clinic", "north")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and str(home / "config.json") in lines[0] and key in lines[0] and says in lines[0], proc.stderr


@pytest.fixture
def server(tmp_path, micro_out):
    srv = published_server(tmp_path, micro_out / "bundle", min_clients=100)
    yield srv
    srv.engine.dispose()


def store(srv: Server, tmp_path, name: str, seed: int, *, round_id: int = 1, keys: dict | None = None) -> str:
    """Enroll ``name`` (unless ``keys`` has it) and store one update of it for ``round_id`` on that
    round's base version, every check of receive_update included."""
    keys = {} if keys is None else keys
    if name not in keys:
        key = keys[name] = generate_key()
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        token, pub = srv.issue_token(name), base64.b64encode(raw).decode()
        body = json.dumps({"token": token, "public_key": pub}).encode()
        srv.enroll(protocol.sign_request(key, name, "POST", "/v1/enroll", body), "POST", "/v1/enroll", body, token, pub)
    key, base = keys[name], round_row(srv, round_id).base_version
    path, uid = write_fake_update(tmp_path / name / f"r{round_id}", srv.head_params(base), seed)
    hpke = HpkePublic.from_dict(srv.server_identity()["hpke_public"])
    env = codec.seal(path.read_bytes(), key=key, hpke_public=hpke, update_id=uid, clinic=name, round_id=round_id,
                     base_version=base, kem="x25519")
    assert srv.receive_update(name, key.public_key(), env).status == "stored"
    return uid


def round_row(srv: Server, rid: int):
    with srv.engine.connect() as conn:
        return conn.execute(select(db.rounds).where(db.rounds.c.id == rid)).one()


def test_summary_stored_on_arrival_and_each_update_opened_once(server, tmp_path):
    srv = server
    ids = [store(srv, tmp_path, f"c{i}", seed=i) for i in range(4)]
    with srv.engine.connect() as conn:
        rows = {r.update_id: r for r in conn.execute(select(db.updates))}
    delta = codec.read(tmp_path / "c0" / "r1" / "outbox" / f"{ids[0]}.npz").delta
    summary = codec.Summary.from_dict(rows[ids[0]].meta)
    assert summary.norm == pytest.approx(codec.norm(delta), rel=1e-12) and summary.n == 50 and len(summary.sha256_plain) == 64

    opened, statements = [], []
    real_get = srv.blobs.get
    srv.blobs.get = lambda sha: (opened.append(sha), real_get(sha))[1]  # counts, then reads the real blob
    event.listen(srv.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    assert rounds.claim(srv, 1)
    version = rounds.aggregate_round(srv, 1)
    assert version == 2
    blobs_of_updates = [sha for sha in opened if sha in {r.blob_sha256 for r in rows.values()}]
    assert sorted(blobs_of_updates) == sorted(r.blob_sha256 for r in rows.values()), "each sealed update read once"
    per_row = [s for s in statements if "FROM rounds" in s and "JOIN" not in s]
    # the round, the strategy state saved with its base version, the final recount: none per update
    assert len(per_row) <= 3, f"no query per update: {len(per_row)} round queries for 4 updates"


def test_update_that_cannot_be_opened_at_aggregation_is_rejected_with_its_reason(server, tmp_path):
    """Old main: the corrupt blob raised out of tick, the round stayed 'aggregating' and every tick
    after the lease tried it again."""
    srv = server
    ids = [store(srv, tmp_path, f"c{i}", seed=i) for i in range(3)]
    with srv.engine.connect() as conn:
        broken = conn.execute(select(db.updates).where(db.updates.c.update_id == ids[1])).one()
    blob = srv.blobs.path(broken.blob_sha256)
    blob.write_bytes(blob.read_bytes()[:-7] + b"garbage")  # bit rot on the server's disk
    with srv.engine.begin() as conn:  # the round is due now
        conn.execute(db.rounds.update().where(db.rounds.c.id == 1).values(min_clients=3))
    assert rounds.tick(srv) == [2]
    r1 = round_row(srv, 1)
    assert r1.state == "closed" and r1.result_version == 2
    assert sorted(r1.report["accepted"]) == ["c0", "c2"]
    assert r1.report["rejected"] == [["c1", f"cannot be opened: blob {broken.blob_sha256[:16]}… is corrupt"]]
    assert set(r1.report["weights"]["shared"]) == {"c0", "c2"}
    assert round_row(srv, 2).state == "open" and rounds.tick(srv) == []
    shown = edge_server("rounds", "--home", str(srv.home.root)).stdout
    assert "rejected: cannot be opened: blob" in shown and shown.count("weight ") == 2, shown


def test_round_that_cannot_be_aggregated_is_closed_as_failed_not_retried(server, tmp_path):
    srv = server
    store(srv, tmp_path, "c0", seed=0)
    with srv.engine.begin() as conn:
        conn.execute(db.rounds.update().where(db.rounds.c.id == 1).values(min_clients=1))
    shutil.rmtree(srv.home.blobs)  # the base version's files are gone: nothing can be published
    srv.home.blobs.mkdir()
    assert rounds.tick(srv) == []
    r1 = round_row(srv, 1)
    assert r1.state == "failed" and "No such file" in r1.report["error"], r1.report
    r2 = round_row(srv, 2)
    assert r2.state == "open" and r2.base_version == 1, "the federation goes on from the same version"
    assert rounds.tick(srv) == [] and round_row(srv, 1).state == "failed", "never tried again"
    assert "not aggregated: FileNotFoundError" in edge_server("rounds", "--home", str(srv.home.root)).stdout


def test_server_logs_carry_request_id_clinic_and_round():
    import io
    import logging

    from server.logs import REQUEST_ID, configure

    stream = io.StringIO()
    saved = {n: (lg.handlers[:], lg.level, lg.propagate) for n in ("server", "federation") for lg in [logging.getLogger(n)]}
    configure("INFO", stream)
    token = REQUEST_ID.set("abc123")
    try:
        logging.getLogger("server.rounds").info("aggregated", extra={"round": 4})
        logging.getLogger("server.service").warning("refused", extra={"clinic": "north", "round": 2})
    finally:
        REQUEST_ID.reset(token)
        for n, (handlers, level, propagate) in saved.items():  # the rest of the session logs as before
            lg = logging.getLogger(n)
            lg.handlers[:], lg.propagate = handlers, propagate
            lg.setLevel(level)
    first, second = stream.getvalue().splitlines()
    assert first.endswith("INFO server.rounds req=abc123 clinic=- round=4 aggregated")
    assert second.endswith("WARNING server.service req=abc123 clinic=north round=2 refused")


def test_rows_stored_before_the_norm_was_recorded_still_aggregate(server, tmp_path):
    """A database written by an older server: the norm is measured at aggregation instead."""
    srv = server
    ids = [store(srv, tmp_path, f"c{i}", seed=i) for i in range(2)]
    with srv.engine.begin() as conn:
        for r in conn.execute(select(db.updates)).all():
            conn.execute(db.updates.update().where(db.updates.c.update_id == r.update_id)
                         .values(meta={k: v for k, v in r.meta.items() if k != "norm"}))
        conn.execute(db.rounds.update().where(db.rounds.c.id == 1).values(min_clients=2))
    assert rounds.tick(srv) == [2]
    report = round_row(srv, 1).report
    delta = codec.read(tmp_path / "c0" / "r1" / "outbox" / f"{ids[0]}.npz").delta
    assert sorted(report["accepted"]) == ["c0", "c1"] and report["norms"]["c0"] == pytest.approx(codec.norm(delta), abs=1e-6)


def test_stateful_strategy_state_is_saved_with_each_version_and_survives_a_restart(tmp_path, micro_out, caplog):
    """dwfl_mw (the default) keeps lambda per clinic: saved with the version a round makes, read by the
    next round on it, also by a restarted server; a clinic that stays worst keeps gaining. Old main
    built a stateless DWFL every round whatever the configuration."""
    srv = published_server(tmp_path, micro_out / "bundle", min_clients=3, strategy_options={"eta": 4.0})
    assert srv.config.strategy == "dwfl_mw"
    keys: dict = {}
    for i in range(3):  # write_fake_update: val_loss 0.6 + 0.01 x seed, so c2 fits worst, every round
        store(srv, tmp_path, f"c{i}", seed=i, keys=keys)
    assert rounds.tick(srv) == [2]
    first = round_row(srv, 1).report
    assert first["strategy"]["name"] == "dwfl_mw" and first["strategy"]["state_entries"] == 3
    state = rounds.saved_state(srv, 2)
    assert state["lambda/c2"] > state["lambda/c1"] > state["lambda/c0"]
    assert rounds.saved_state(srv, 1) == {}, "the first version was made by no round"

    srv.engine.dispose()
    srv = Server(srv.home)  # a restart: nothing in memory
    restored = rounds.saved_state(srv, 2)
    assert restored.keys() == state.keys() and all(float(restored[k]) == float(state[k]) for k in state)
    for i in range(3):
        store(srv, tmp_path, f"c{i}", seed=10 + i, keys=keys)  # same losses order, round 2 on version 2
    assert rounds.tick(srv) == [3]
    second = round_row(srv, 2).report
    assert second["weights"]["shared"]["c2"] > first["weights"]["shared"]["c2"], (first["weights"], second["weights"])
    assert rounds.saved_state(srv, 3)["lambda/c2"] > state["lambda/c2"], "the worst clinic keeps gaining"

    srv.engine.dispose()
    srv.home.config_path.write_text(json.dumps({**json.loads(srv.home.config_path.read_text()), "strategy": "fedavg",
                                                "strategy_options": {}}))
    srv = Server(srv.home)
    with caplog.at_level("WARNING", logger="server.rounds"):
        assert rounds.saved_state(srv, 3) == {}
    assert "made by strategy 'dwfl_mw'" in caplog.text
    srv.engine.dispose()


def test_a_failed_round_leaves_the_state_of_its_base_version_as_it_was(tmp_path, micro_out):
    """The retry of a failed round starts from the same strategy state: the failed round commits none."""
    srv = published_server(tmp_path, micro_out / "bundle", min_clients=2)
    keys: dict = {}
    for i in range(2):
        store(srv, tmp_path, f"c{i}", seed=i, keys=keys)
    assert rounds.tick(srv) == [2]
    before = rounds.saved_state(srv, 2)
    assert before, "dwfl_mw saved its lambda with version 2"
    srv.config.max_param_abs = 1e-9  # every aggregated head is now refused before publication
    for i in range(2):
        store(srv, tmp_path, f"c{i}", seed=20 + i, round_id=2, keys=keys)
    assert rounds.tick(srv) == []
    assert round_row(srv, 2).state == "failed" and round_row(srv, 3).base_version == 2
    after = rounds.saved_state(srv, 2)
    assert after.keys() == before.keys() and all(float(after[k]) == float(before[k]) for k in before)
    assert "strategy" not in (round_row(srv, 2).report or {}), "a failed round names no state"
    srv.engine.dispose()
