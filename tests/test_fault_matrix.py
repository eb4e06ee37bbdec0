"""The fault matrix: kill -9 at seeded random points of real processes, then restart and check.

Clinic (`edge-run sync` against a live server): killed while the new global model is downloaded and
swapped in, while fine-tuning, while uploading; and the disk full during the ledger charge. Server (`edge-server serve`): killed while receiving
updates, while aggregating, while publishing the new version. A dry run of each operation lists its
steps (tests/crashpoints.py: every rename, fsync, write, unlink, SQL statement and commit, HTTP
request); each seed picks one step of the phase and the process sends itself SIGKILL there.

After every kill, and again after the restart, the invariants:
* no half-written file under a final name (bundles verify, ledger and updates parse, blobs match
  their SHA-256), the active model is a verified one;
* no lost update (every update the server acknowledged is stored) and no doubled one (one per clinic
  and round, a round aggregated and published once);
* the privacy ledger is never under-charged (charges >= updates that exist anywhere).

FAULT_SEEDS=0,1,2,... runs more seeds; FAULT_MATRIX_OUT=FILE appends one JSON line per scenario
(benchmarks/fault_matrix.py turns them into the table of the README).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from edge_runtime.bundle import _verify_signature, load_bundle
from edge_runtime.errors import Refused
from edge_runtime.state import ClinicState, read_update
from edge_runtime.keys import load_public_key
from edge_runtime.sync.client import Client, enroll
from server import db
from server.blobs import BlobStore
from server.home import Home
from server.rounds import due_rounds
from server.service import Server

from .conftest import edge_export
from .server_util import ROOT, ServerProcess, edge_server, write_fake_update
from .test_finetune_cli import NO_TORCH

SEEDS = [int(s) for s in os.environ.get("FAULT_SEEDS", "0,1").split(",")]
CLINIC_PHASES = ["swap", "finetune", "upload"]
SERVER_PHASES = ["upload", "aggregate", "publish"]
ARM_CLINIC = "import tests.crashpoints as _c; _c.arm('clinic')"
ARM_SERVER = "import tests.crashpoints as _c; _c.arm('server')"


# Besides the seeded points, the narrowest windows by name: the first step whose label starts so
# (" >N": the N-th step after it).
NAMED_CLINIC = {
    "swap": ["swap:rename:bundles/current.json"],  # new version in place, not yet the current one
    "finetune": ["finetune:rename-done:state/clinic.json",  # dataset registered, nothing charged yet
                 "finetune:write-done:",  # the charge is on disk, its head record not yet
                 "finetune:rename-done:outbox/"],  # the update exists, it is not queued yet
    "upload": ["upload:http:POST /v1/updates",  # queued, the request not sent
               "upload:http-done:POST /v1/updates"],  # the server stored it, the clinic does not know
}
NAMED_SERVER = {
    "upload": ["upload:sql:INSERT INTO updates >2"],  # the first update is committed, its answer not sent
    "aggregate": ["aggregate:commit >1"],  # the claim is committed, nothing aggregated yet
    "publish": ["publish:rename-done:", "publish:commit"],  # new blobs on disk; the one transaction
}


def points(phases: list[str], named: dict[str, list[str]]) -> list[tuple[str, int | str]]:
    return [(ph, p) for ph in phases for p in [*SEEDS, *named.get(ph, [])]]


def pick(labels: list[str], phase: str, point: int | str) -> tuple[int, str]:
    """The step (1-based) to kill at: seeded random among the dry run's steps of ``phase``, or the
    first one whose label starts with ``point``."""
    steps = [i for i, label in enumerate(labels, start=1) if label.startswith(phase + ":")]
    assert steps, f"the dry run has no step in phase {phase!r}"
    if isinstance(point, str):
        prefix, _, after = point.partition(" >")
        named = [i for i in steps if labels[i - 1].startswith(prefix)]
        assert named, f"the dry run has no step {prefix!r}"
        k = named[0] + int(after or 0)
    else:
        k = random.Random(f"{phase}-{point}").choice(steps)
    return k, labels[k - 1]


def record(row: dict) -> None:
    out = os.environ.get("FAULT_MATRIX_OUT")
    if out:
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def engine_of(home: Path):
    return db.make_engine(Home(home).db_url(None))


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


# ---------------------------------------------------------------- clinic side

def sync(state: Path, url: str, manifest: Path, crash_at: int = 0, log: Path | None = None,
         full_at: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "DWFL_CRASH_AT": str(crash_at), "DWFL_FULL_AT": str(full_at)}
    if log:
        env["DWFL_CRASH_LOG"] = str(log)
    args = ["sync", "--state", str(state), "--server", url, "--manifest", str(manifest), "--epsilon", "4", "--round-epsilon", "1",
            "--epochs", "3", "--seed", "5", "--retries", "0", "--timeout", "20", "--json"]
    return subprocess.run([sys.executable, "-c", NO_TORCH.replace("{patch}", ARM_CLINIC), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def clinic_setup(tmp_path_factory, micro_out) -> dict:
    """A server home (version 1, round 1 open, two clients per round) and one enrolled clinic; the
    dry run's step labels."""
    root = tmp_path_factory.mktemp("fm-clinic")
    data = root / "data"
    proc = edge_export("synth", "--out", str(data), "--config", "micro", "--seed", "3", "--cases", "40", "--start", "7000")
    assert proc.returncode == 0, proc.stderr
    home = root / "home"
    assert edge_server("init", "--home", str(home), "--min-clients", "2", "--round-seconds", "3600").returncode == 0
    assert edge_server("publish", "--home", str(home), str(micro_out / "bundle")).returncode == 0
    srv = ServerProcess(home, None).start()
    try:
        token = edge_server("token", "--home", str(home), "--clinic", "clinic-k").stdout.strip()
        enroll(root / "state", srv.url, token, "x25519")
        assert ClinicState(root / "state").clinic_id == "clinic-k"  # enrollment made the one id: the same split, the same steps
    finally:
        srv.stop()
    setup = {"home": home, "state": root / "state", "manifest": data / "manifest.csv"}
    dry = copy_setup(setup, root / "dry")
    srv = ServerProcess(dry["home"], None).start()
    try:
        log = root / "dry-steps.txt"
        proc = sync(dry["state"], srv.url, dry["manifest"], log=log)
        assert proc.returncode == 0, proc.stderr
    finally:
        srv.stop()
    setup["labels"] = log.read_text().splitlines()
    return setup


def copy_setup(setup: dict, dest: Path) -> dict:
    dest.mkdir(parents=True)
    out = dict(setup)
    for key in ("home", "state"):
        out[key] = dest / key
        shutil.copytree(setup[key], out[key], ignore=shutil.ignore_patterns("*.log"))
    return out


def check_clinic(state: Path, home: Path) -> dict:
    """Every committed file of the clinic is whole and the ledger covers every update; the facts."""
    server_key = load_public_key(state / "sync" / "server.pub")
    current = None
    if (state / "bundles" / "current.json").exists():
        doc = json.loads((state / "bundles" / "current.json").read_text())
        bundle = load_bundle(state / "bundles" / doc["folder"], server_key)  # verified, or raises
        current = int(doc["version"])
        ClinicState(state).active_head(bundle)  # verified, or raises
    for folder in (state / "bundles").glob("v*"):
        load_bundle(folder, server_key)  # an installed version is always a whole, verified one
    ids: set[str] = set()
    for path in (state / "outbox").glob("*.npz"):
        ids.add(read_update(path)[1]["update_id"])
    for folder in ("pending", "sent"):
        for side in (state / "sync" / folder).glob("*.json"):
            json.loads(side.read_text())
            ids.add(side.stem)
    charges = 0
    if (state / "clinic.json").exists():
        st = ClinicState(state)
        for name in st.datasets():
            charges += len(st.ledger(name).charges)  # its own delta and budget
    engine = engine_of(home)
    with engine.connect() as conn:
        on_server = [r.update_id for r in conn.execute(select(db.updates).where(db.updates.c.clinic == "clinic-k"))]
    engine.dispose()
    ids |= set(on_server)
    assert charges >= len(ids), f"ledger under-charged: {charges} charges for updates {sorted(ids)}"
    return {"current": current, "charges": charges, "updates": len(ids), "on_server": len(on_server),
            "pending": len(list((state / "sync" / "pending").glob("*.json"))), "temp_files": len(temp_files(state))}


@pytest.mark.parametrize(("phase", "point"), points(CLINIC_PHASES, NAMED_CLINIC))
def test_clinic_killed(clinic_setup, tmp_path, phase, point):
    k, label = pick(clinic_setup["labels"], phase, point)
    s = copy_setup(clinic_setup, tmp_path / "run")
    srv = ServerProcess(s["home"], None).start()
    try:
        crashed = sync(s["state"], srv.url, s["manifest"], crash_at=k)
        assert crashed.returncode == -9, f"not killed at step {k} ({label}): rc {crashed.returncode} {crashed.stderr[-500:]}"
        after_kill = check_clinic(s["state"], s["home"])
        again = sync(s["state"], srv.url, s["manifest"])
        assert again.returncode == 0, f"after a kill at step {k} ({label}): {again.stderr[-800:]}"
        report = json.loads(again.stdout)
        final = check_clinic(s["state"], s["home"])
    finally:
        srv.stop()
    assert final["current"] == 1 and final["on_server"] == 1 and final["pending"] == 0 and final["temp_files"] == 0, final
    # the rerun trains (and charges) again only when the killed run left no update: an update that
    # exists is queued, not made twice
    assert final["charges"] == after_kill["charges"] + (1 if after_kill["updates"] == 0 else 0), (after_kill, final)
    statuses = [u["status"] for u in report["uploads"]]
    if after_kill["on_server"] == 1 and after_kill["pending"] == 0:  # killed after the answer was recorded
        assert statuses == [] and "already sent" in report["finetune"], report
    else:
        assert statuses in (["stored"], ["already have it"]), report
    record({"side": "clinic", "phase": phase, "point": point, "step": k, "label": label, "after_kill": after_kill,
            "after_restart": final, "restart_upload": statuses[0] if statuses else "nothing to send", "extra_charges": final["charges"] - final["updates"]})


def test_clinic_disk_full_during_the_ledger_charge(clinic_setup, tmp_path):
    """The disk fills up inside the ledger append (half the line written, then ENOSPC): exit 3, the
    ledger as it was (readable, nothing charged, nothing made), and the next sync trains and sends."""
    k, label = pick(clinic_setup["labels"], "finetune", "finetune:write:")
    s = copy_setup(clinic_setup, tmp_path / "run")
    srv = ServerProcess(s["home"], None).start()
    try:
        full = sync(s["state"], srv.url, s["manifest"], full_at=k)
        lines = full.stderr.strip().splitlines()
        assert full.returncode == 3 and len(lines) == 1 and "disk full" in lines[0] and "ledger.jsonl" in lines[0], full.stderr[-800:]
        after = check_clinic(s["state"], s["home"])  # the ledger reads (it raises when corrupt)
        again = sync(s["state"], srv.url, s["manifest"])
        assert again.returncode == 0, f"after a full disk at step {k} ({label}): {again.stderr[-800:]}"
        report = json.loads(again.stdout)
        final = check_clinic(s["state"], s["home"])
    finally:
        srv.stop()
    assert after["charges"] == 0 and after["updates"] == 0 and after["temp_files"] == 0, after
    assert final["current"] == 1 and final["charges"] == 1 and final["on_server"] == 1 and final["pending"] == 0, final
    statuses = [u["status"] for u in report["uploads"]]
    assert statuses == ["stored"], report
    record({"side": "clinic", "fault": "disk full", "phase": "finetune", "point": "ledger charge", "step": k, "label": label,
            "after_kill": after, "after_restart": final, "restart_upload": statuses[0], "extra_charges": final["charges"] - final["updates"]})


# ---------------------------------------------------------------- server side

def upload_all(url: str, clinics: list[dict], acked: list[str]) -> None:
    """Each clinic uploads its update once, in order; stops at the first failure (a dead server)."""
    for c in clinics:
        client = Client(c["state"], url, retries=0, timeout=10)
        try:
            answer = client.upload(c["path"], c["update_id"], 1, 1)
        except Refused:
            return
        finally:
            client.http.close()
        assert answer["status"] in ("stored", "already have it"), answer
        acked.append(c["update_id"])
        time.sleep(0.3)  # the tick the upload started runs alone: steps come in the same order each run


def wait_round_closed(home: Path, seconds: float = 40) -> None:
    engine = engine_of(home)
    deadline = time.time() + seconds
    try:
        while time.time() < deadline:
            with engine.connect() as conn:
                if conn.execute(select(db.rounds.c.state).where(db.rounds.c.id == 1)).scalar_one() == "closed":
                    return
            time.sleep(0.2)
    finally:
        engine.dispose()
    raise AssertionError("round 1 was not aggregated after the restart")


@pytest.fixture(scope="module")
def server_setup(tmp_path_factory, micro_out) -> dict:
    """A server home (version 1, round 1 open, 3 clients per round, lease 1 s), three enrolled clinics
    with an update each; the dry run's step labels."""
    import numpy as np

    root = tmp_path_factory.mktemp("fm-server")
    home = root / "home"
    assert edge_server("init", "--home", str(home), "--min-clients", "3", "--lease-seconds", "1", "--round-seconds", "3600").returncode == 0
    assert edge_server("publish", "--home", str(home), str(micro_out / "bundle")).returncode == 0
    with np.load(micro_out / "bundle" / "head.npz") as z:
        head = {k: z[k] for k in z.files}
    clinics = []
    srv = ServerProcess(home, None).start()
    try:
        for i in range(3):
            name = f"site-{i}"
            token = edge_server("token", "--home", str(home), "--clinic", name).stdout.strip()
            enroll(root / name, srv.url, token, "x25519")
            path, uid = write_fake_update(root / name, head, seed=i)
            clinics.append({"state": root / name, "path": path, "update_id": uid})
    finally:
        srv.stop()
    setup = {"root": root, "home": home, "clinics": clinics}
    dry = tmp_path_factory.mktemp("fm-server-dry") / "home"
    shutil.copytree(home, dry, ignore=shutil.ignore_patterns("*.log"))
    log = root / "dry-steps.txt"
    srv = ServerProcess(dry, None, tick=3600).start(ARM_SERVER, env={"DWFL_CRASH_LOG": str(log)})
    try:
        acked: list[str] = []
        upload_all(srv.url, clinics, acked)
        assert len(acked) == 3
        wait_round_closed(dry)
    finally:
        srv.stop()
    setup["labels"] = log.read_text().splitlines()
    return setup


def check_server(home: Path, acked: list[str]) -> dict:
    """Every stored row points at a whole blob, counters agree with rows, every version verifies."""
    h = Home(home)
    blobs, key = BlobStore(h.blobs), h.signing_key().public_key()
    for path in h.blobs.rglob("*"):
        if path.is_file() and ".tmp" not in path.name:
            blobs.get(path.parent.name + path.name)  # its content matches its SHA-256 name, or raises
    engine = engine_of(home)
    with engine.connect() as conn:
        rounds = [dict(r._mapping) for r in conn.execute(select(db.rounds).order_by(db.rounds.c.id))]
        updates = [dict(r._mapping) for r in conn.execute(select(db.updates))]
        versions = [dict(r._mapping) for r in conn.execute(select(db.versions).order_by(db.versions.c.version))]
    engine.dispose()
    for u in updates:
        blobs.get(u["blob_sha256"])
    for r in rounds:
        assert r["n_updates"] == sum(1 for u in updates if u["round"] == r["id"]), (r, updates)
    assert sum(1 for r in rounds if r["state"] == "open") <= 1
    for v in versions:
        manifest = json.loads(blobs.get(v["manifest_sha256"]))
        _verify_signature(manifest, Path(f"version {v['version']}"), key)
        for meta in manifest["files"].values():
            blobs.get(meta["sha256"])
    assert set(acked) <= {u["update_id"] for u in updates}, "an acknowledged update was lost"
    assert len({(u["clinic"], u["round"]) for u in updates}) == len(updates)
    return {"round1": rounds[0]["state"], "updates": len(updates), "versions": [v["version"] for v in versions],
            "rounds": len(rounds), "temp_files": len(temp_files(h.blobs))}


@pytest.mark.parametrize(("phase", "point"), points(SERVER_PHASES, NAMED_SERVER))
def test_server_killed(server_setup, tmp_path, phase, point):
    k, label = pick(server_setup["labels"], phase, point)
    home = tmp_path / "home"
    shutil.copytree(server_setup["home"], home, ignore=shutil.ignore_patterns("*.log"))
    clinics = server_setup["clinics"]
    srv = ServerProcess(home, None, tick=3600).start(ARM_SERVER, env={"DWFL_CRASH_AT": str(k)})
    acked: list[str] = []
    try:
        upload_all(srv.url, clinics, acked)
        assert srv.wait_exit(30) == -9, f"server not killed at step {k} ({label})"
        after_kill = check_server(home, acked)
        srv.tick = 0.3
        srv.start("")  # restart; the clients retry what they hold
        answers = []
        for c in clinics:
            client = Client(c["state"], srv.url, retries=3, backoff=0.2, timeout=20)
            answers.append(client.upload(c["path"], c["update_id"], 1, 1)["status"])
            client.http.close()
        assert set(answers) <= {"stored", "already have it"}, answers
        wait_round_closed(home)
        assert not due_rounds(Server(Home(home))), "nothing is left to aggregate: round 1 is closed once, round 2 empty"
        final = check_server(home, [c["update_id"] for c in clinics])
        bundle = Client(clinics[0]["state"], srv.url, retries=2).pull(2)  # verified by a clinic
    finally:
        srv.stop()
    assert final["round1"] == "closed" and final["versions"] == [1, 2] and final["rounds"] == 2 and final["updates"] == 3, final
    assert final["temp_files"] == 0, "the restarted server removes the killed one's temporary files"
    assert bundle.manifest["federation"]["round"] == 1 and sorted(bundle.manifest["federation"]["clients"]) == ["site-0", "site-1", "site-2"]
    record({"side": "server", "phase": phase, "point": point, "step": k, "label": label, "acked_before_kill": len(acked),
            "after_kill": after_kill, "after_restart": final, "restart_uploads": answers})
