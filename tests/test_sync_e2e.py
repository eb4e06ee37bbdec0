"""End to end on loopback: a real uvicorn server, three real clinic CLI processes (torch absent)
with different data, two federated rounds, and a wrongly signed version refused by a clinic."""

from __future__ import annotations

import json
import time

import pytest

from edge_runtime.keys import generate_key
from server.home import Home
from server.service import Server

from .conftest import edge_export
from .server_util import ServerProcess, edge_server
from .test_finetune_cli import run as edge_run

CLINICS = {"north": 2000, "south": 2100, "east": 2200}


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    out = {}
    for i, (name, start) in enumerate(CLINICS.items()):
        folder = tmp_path_factory.mktemp("data") / name
        proc = edge_export("synth", "--out", str(folder), "--config", "micro", "--seed", "3", "--cases", "60", "--start", str(start),
                           "--sites", str(2 + i))
        assert proc.returncode == 0, proc.stderr
        out[name] = folder / "manifest.csv"
    return out


def test_two_rounds_end_to_end(tmp_path, micro_out, manifests):
    home = tmp_path / "srv"
    assert edge_server("init", "--home", str(home), "--min-clients", "3").returncode == 0
    assert edge_server("publish", "--home", str(home), str(micro_out / "bundle")).returncode == 0
    srv = ServerProcess(home, None).start()
    try:
        states = {}
        for name in CLINICS:
            token = edge_server("token", "--home", str(home), "--clinic", name).stdout.strip()
            states[name] = tmp_path / f"state-{name}"
            proc = edge_run("enroll", "--server", srv.url, "--token", token, "--state", str(states[name]), "--json")
            assert proc.returncode == 0, proc.stderr
            assert (states[name] / "sync" / "clinic_ed25519.pem").stat().st_mode & 0o777 == 0o600
        for rnd in (1, 2):
            for i, name in enumerate(CLINICS):
                proc = edge_run("sync", "--state", str(states[name]), "--manifest", str(manifests[name]), "--epsilon", "4",
                                "--round-epsilon", "1.5", "--epochs", "5", "--seed", str(10 * rnd + i), "--json")
                assert proc.returncode == 0, proc.stderr
                report = json.loads(proc.stdout)
                assert report["version"] == rnd and report["round"] == rnd
                assert [u["status"] for u in report["uploads"]] == ["stored"], report
            deadline = time.time() + 30
            while time.time() < deadline and json.loads(edge_server("rounds", "--home", str(home), "--json").stdout)[rnd - 1]["state"] != "closed":
                time.sleep(0.5)
        rs = json.loads(edge_server("rounds", "--home", str(home), "--json").stdout)
        assert [r["state"] for r in rs] == ["closed", "closed", "open"] and [r["result_version"] for r in rs[:2]] == [2, 3]
        for r in rs[:2]:
            assert sorted(a["clinic"] for a in r["arrivals"]) == sorted(CLINICS)
            assert sum(r["report"]["weights"]["shared"].values()) == pytest.approx(1.0, abs=1e-5)
        # a sync without data only pulls; a second sync in the same round sends nothing twice
        north = states["north"]
        proc = edge_run("sync", "--state", str(north), "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["version"] == 3 and json.loads((north / "bundles" / "current.json").read_text())["version"] == 3
        proc = edge_run("infer", "--bundle", str(north / "bundles" / "v3"), "--trusted-key", str(north / "sync" / "server.pub"),
                        "--state", str(north), "--synthetic", "--case-id", "5", "--json")
        assert proc.returncode == 0, proc.stderr
        # a version signed by another key is refused by the clinic; the verified one stays current
        rogue = Server(Home(home))
        rogue.signing_key = generate_key()
        with rogue.engine.begin() as conn:
            m = rogue.manifest(3)
            files = {n: rogue.blobs.get(x["sha256"]) for n, x in m["files"].items()}
            rogue.publish_manifest({k: v for k, v in m.items() if k not in ("signature", "files")}, files, None, conn)
        proc = edge_run("sync", "--state", str(north), "--json")
        assert proc.returncode == 2 and "not by the trusted key" in proc.stderr, proc.stderr
        assert json.loads((north / "bundles" / "current.json").read_text())["version"] == 3
        assert not (north / "bundles" / "v4").exists()
    finally:
        srv.stop()
