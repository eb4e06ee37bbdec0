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


def test_one_state_folder_finetunes_syncs_pulls_and_predicts_with_the_new_version(tmp_path, micro_out, manifests):
    """Regression (issue 14): a clinic that had ever fine-tuned (STATE/heads/ exists) ran a pulled
    version on head.onnx (version 1's head) instead of its federated head.npz. One state folder here
    fine-tunes, syncs, pulls the next version and predicts with it."""
    import numpy as np

    from edge_runtime.bundle import load_bundle
    from edge_runtime.cli import synthetic_cohort
    from edge_runtime.finetune.head import load_params
    from edge_runtime.keys import load_public_key
    from edge_runtime.model import EdgeModel
    from edge_runtime.variants import resolve_variant

    home, state = tmp_path / "srv", tmp_path / "state"
    assert edge_server("init", "--home", str(home), "--min-clients", "1").returncode == 0
    assert edge_server("publish", "--home", str(home), str(micro_out / "bundle")).returncode == 0
    srv = ServerProcess(home, None).start()
    try:
        token = edge_server("token", "--home", str(home), "--clinic", "solo").stdout.strip()
        assert edge_run("enroll", "--server", srv.url, "--token", token, "--state", str(state)).returncode == 0
        assert json.loads((state / "clinic.json").read_text())["clinic_id"] == "solo", "the enrolled name is the one id"
        assert edge_run("sync", "--state", str(state), "--json").returncode == 0  # pulls version 1
        privacy = ["--epsilon", "4", "--round-epsilon", "1.5", "--epochs", "5"]
        ft = edge_run("finetune", "--bundle", str(state / "bundles" / "v1"), "--state", str(state), "--manifest",
                      str(manifests["north"]), *privacy, "--tolerance", "1", "--seed", "3", "--json")
        assert ft.returncode == 0, ft.stderr
        made = json.loads(ft.stdout)
        assert made["activated"] and made["update_id"].startswith("solo-") and (state / "heads").is_dir()
        proc = edge_run("sync", "--state", str(state), "--manifest", str(manifests["north"]), *privacy, "--seed", "4", "--json")
        assert proc.returncode == 0, proc.stderr
        assert [u["status"] for u in json.loads(proc.stdout)["uploads"]] == ["stored"]
        deadline = time.time() + 60
        while time.time() < deadline and json.loads(edge_server("rounds", "--home", str(home), "--json").stdout)[0]["state"] != "closed":
            time.sleep(0.5)
        proc = edge_run("sync", "--state", str(state), "--json")
        assert proc.returncode == 0 and json.loads(proc.stdout)["version"] == 2, proc.stderr
        v2 = state / "bundles" / "v2"
        infer = edge_run("infer", "--bundle", str(v2), "--state", str(state), "--synthetic", "--case-id", "5", "--json")
        assert infer.returncode == 0, infer.stderr  # no --trusted-key: the server key pinned at enrollment
        got = json.loads(infer.stdout)["probability"]
    finally:
        srv.stop()
    bundle = load_bundle(v2, load_public_key(state / "sync" / "server.pub"))
    variant, _ = resolve_variant(bundle, None, None)
    case = synthetic_cohort(bundle).case(5)
    federated = load_params(v2 / "head.npz", int(bundle.manifest["embedding_dim"]), len(bundle.classes))
    expected = EdgeModel.from_bundle(bundle, variant, head_params=federated).predict(case).probability
    version1 = EdgeModel.from_bundle(bundle, variant).predict(case).probability  # head.onnx: version 1's head
    assert abs(expected - version1) > 1e-4, "the federated head changed the prediction"
    assert got == pytest.approx(expected, abs=2e-6) and np.isfinite(got)
