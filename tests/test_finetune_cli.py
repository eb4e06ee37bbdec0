"""`edge-run finetune / rollback / status` on a real micro bundle and real case files, torch absent."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime.bundle import MANIFEST, write_bundle
from edge_runtime.finetune.head import forward, load_params
from edge_runtime.finetune.plan import FinetunePlan
from edge_runtime.state import read_update
from edge_runtime.keys import load_private_key
from edge_runtime.privacy.accountant import RoundEvents, epsilon

from .conftest import edge_export

# torch made unimportable the way a clinic without it sees it (ModuleNotFoundError). The conftest's
# sys.modules['torch'] = None trick breaks scipy (which dp-accounting imports): scipy probes
# sys.modules['torch'] for its array-API support and reads .Tensor from it.
NO_TORCH = """
import sys, importlib.abc
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == 'torch' or name.startswith('torch.'):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
{patch}
from edge_runtime.cli import main
sys.argv[0] = 'edge-run'
main()
"""
# A hard crash after the ledger charge, while the update is being written.
CRASH_ON_UPDATE = "import os, edge_runtime.state as s; s.ClinicState.write_update = lambda *a, **k: os._exit(9)"


def run(*args: str, patch: str = "") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", NO_TORCH.replace("{patch}", patch), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "cases"
    proc = edge_export("synth", "--out", str(out), "--config", "micro", "--seed", "3", "--cases", "120", "--start", "2000")
    assert proc.returncode == 0, proc.stderr
    return out / "manifest.csv"


def finetune(bundle, manifest, state, *extra, patch=""):
    return run("finetune", "--bundle", str(bundle), "--manifest", str(manifest), "--state", str(state), "--seed", "1",
               "--json", *extra, patch=patch)


def ledger_lines(state):
    path = state / "privacy" / "default" / "ledger.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def test_numpy_head_matches_head_onnx(micro_out):
    bundle = micro_out / "bundle"
    params = load_params(bundle / "head.npz", 16, 2)
    rng = np.random.default_rng(0)
    mask = (rng.random((64, 3)) > 0.4).astype(np.float32)
    mask[:, 0] = 1.0
    emb = (rng.normal(size=(64, 3, 16)) * mask[..., None]).astype(np.float32)
    (expected,) = ort.InferenceSession(str(bundle / "head.onnx")).run(None, {"embeddings": emb, "mask": mask})
    assert np.abs(forward(params, emb, mask) - expected).max() <= 1e-5  # non-zero adapters: see test_finetune_math (torch)
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert manifest["head"]["weights"] == "head.npz" and "head.npz" in manifest["files"]


def test_finetune_round_status_infer_rollback(micro_out, cases, tmp_path):
    bundle, state = micro_out / "bundle", tmp_path / "state"
    probe = ["infer", "--bundle", str(bundle), "--state", str(state), "--synthetic", "--case-id", "7", "--case-id", "8", "--json"]
    before = [json.loads(line)["probability"] for line in run(*probe).stdout.splitlines()]
    assert len(before) == 2

    # --tolerance 1: the new head always goes live, so infer's numpy-head path is exercised.
    proc = finetune(bundle, cases, state, "--round-epsilon", "0.3", "--tolerance", "1")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    p = report["privacy"]
    assert report["cases"]["train"] + report["cases"]["validation"] == 120 and report["cases"]["rejected"] == 0
    events = RoundEvents(p["sampling_rate"], p["noise_multiplier"], p["steps"], p["meta_noise_multiplier"])
    assert p["epsilon_spent"] == pytest.approx(epsilon([events], 1e-5), abs=1e-5) and 0.29 < p["epsilon_spent"] <= 0.3
    assert p["epsilon_left"] == pytest.approx(0.5 - p["epsilon_spent"], abs=1e-5)
    delta, meta = read_update(report["update"])
    plan = FinetunePlan.of_manifest(json.loads((bundle / MANIFEST).read_text()))
    head_names = set(np.load(bundle / "head.npz").files)
    assert set(delta) == set(plan.names(head_names)) and report["plan"]["trainable"] == meta["trainable"] == plan.trainable
    assert any(np.abs(d).max() > 0 for d in delta.values())
    for key in ("n", "val_loss", "modality_fraction", "noise_multiplier", "update_id"):
        assert key in meta
    for key in ("sampling_rate", "steps", "epsilon_round", "epsilon_spent"):  # with the batch size they give n_train exactly
        assert key not in meta, key
    assert meta["noise_multiplier"] <= p["noise_multiplier"] < meta["noise_multiplier"] + 0.5 and meta["noise_multiplier"] % 0.5 == 0
    assert "auc" not in json.dumps(meta), "local validation results stay on the clinic"
    assert len(ledger_lines(state)) == 1

    status = json.loads(run("status", "--state", str(state), "--bundle", str(bundle), "--json").stdout)
    assert status["datasets"][0]["epsilon_spent"] == pytest.approx(p["epsilon_spent"], abs=1e-6)
    assert status["outbox"] == [report["update_id"] + ".npz"]

    after = [json.loads(line)["probability"] for line in run(*probe).stdout.splitlines()]
    assert len(after) == 2 and report["activated"]
    if report["activated"]:
        assert status["active_head"] == report["round_id"]
        assert max(abs(a - b) for a, b in zip(before, after)) > 1e-6, "infer uses the fine-tuned head"
        back = run("rollback", "--bundle", str(bundle), "--state", str(state), "--json")
        assert back.returncode == 0 and json.loads(back.stdout)["active"] is None
        restored = [json.loads(line)["probability"] for line in run(*probe).stdout.splitlines()]
        assert restored == pytest.approx(before, abs=2e-6)
    nothing = run("rollback", "--bundle", str(bundle), "--state", str(state))
    assert nothing.returncode == 1 and "nothing to roll back" in nothing.stderr

    # Second round: embeddings come from the cache; the ledger composes both rounds; --rounds 1
    # (in place of the plan's 10) spends all that is left.
    proc2 = finetune(bundle, cases, state, "--rounds", "1")
    assert proc2.returncode == 0, proc2.stderr
    r2 = json.loads(proc2.stdout)
    assert r2["cases"]["cached"] == 120 and r2["seconds"]["embed"] < report["seconds"]["embed"]
    p2 = r2["privacy"]
    events2 = RoundEvents(p2["sampling_rate"], p2["noise_multiplier"], p2["steps"], p2["meta_noise_multiplier"])
    assert p2["epsilon_spent"] == pytest.approx(epsilon([events, events2], 1e-5), abs=1e-5) and 0.499 <= p2["epsilon_spent"] <= 0.5

    # Third: the budget is spent; refused with exit 1, nothing written, nothing charged.
    proc3 = finetune(bundle, cases, state)
    assert proc3.returncode == 1 and "privacy budget spent" in proc3.stderr and proc3.stdout == ""
    assert len(ledger_lines(state)) == 2 and len(list((state / "outbox").glob("*.npz"))) == 2


def test_crash_between_charge_and_upload_leaves_budget_charged(micro_out, cases, tmp_path):
    state = tmp_path / "state"
    proc = finetune(micro_out / "bundle", cases, state, "--rounds", "1", patch=CRASH_ON_UPDATE)  # the whole budget in one round
    assert proc.returncode == 9, proc.stderr
    assert not list((state / "outbox").glob("*")) if (state / "outbox").exists() else True
    assert len(ledger_lines(state)) == 1
    status = json.loads(run("status", "--state", str(state), "--json").stdout)
    assert status["datasets"][0]["epsilon_spent"] == pytest.approx(0.5, abs=1e-3)
    again = finetune(micro_out / "bundle", cases, state)
    assert again.returncode == 1 and "budget spent" in again.stderr


def _one_line(proc, *needles):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("kind", ["missing_label", "non_binary", "empty", "one_class"])
def test_bad_labels_or_manifest_exit_2_nothing_spent(micro_out, cases, tmp_path, kind):
    lines = cases.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    if kind == "missing_label":
        cells = rows[5].split(",")
        cells[4] = ""
        rows[5] = ",".join(cells)
    elif kind == "non_binary":
        cells = rows[3].split(",")
        cells[4] = "2"
        rows[3] = ",".join(cells)
    elif kind == "empty":
        rows = []
    else:
        rows = [r for r in rows if r.split(",")[4] == "negative"]
    bad = cases.parent / f"{kind}.csv"
    bad.write_text("\n".join([header, *rows]) + "\n")
    state = tmp_path / "state"
    needle = {"missing_label": "line 7", "non_binary": "binary", "empty": "no cases", "one_class": "both classes"}[kind]
    _one_line(finetune(micro_out / "bundle", bad, state), str(bad.name), needle)
    assert ledger_lines(state) == [] and not (state / "outbox").exists()


def test_edited_ledger_exit_2_nothing_spent(micro_out, cases, tmp_path):
    state = tmp_path / "state"
    assert finetune(micro_out / "bundle", cases, state, "--round-epsilon", "0.1").returncode == 0
    path = state / "privacy" / "default" / "ledger.jsonl"
    entry = json.loads(path.read_text())
    entry["events"]["noise_multiplier"] *= 2  # pretend less was spent
    path.write_text(json.dumps(entry, sort_keys=True) + "\n")
    outbox = sorted((state / "outbox").iterdir())
    _one_line(finetune(micro_out / "bundle", cases, state), "ledger.jsonl", "hash chain")
    _one_line(run("status", "--state", str(state)), "ledger.jsonl")
    assert sorted((state / "outbox").iterdir()) == outbox
    shutil.rmtree(state / "privacy")  # deleting the ledger does not reset the budget
    _one_line(finetune(micro_out / "bundle", cases, state), "missing")


def test_bundle_head_that_does_not_match_is_refused(micro_out, cases, tmp_path):
    src = micro_out / "bundle"
    manifest = json.loads((src / MANIFEST).read_text())
    params = dict(np.load(src / "head.npz"))
    params["classifier.weight"] = np.zeros((2, 12), np.float32)  # not the bundle's embedding dim
    bad_npz = tmp_path / "head.npz"
    np.savez(bad_npz, **params)
    files = {name: src / name for name in manifest["files"]}
    files["head.npz"] = bad_npz
    body = {k: v for k, v in manifest.items() if k not in ("files", "signature", "format_version")}
    bundle = write_bundle(tmp_path / "b", files, body, load_private_key(micro_out / "signing_key.pem"))
    shutil.copy(micro_out / "bundle.pub", tmp_path / "b.pub")
    state = tmp_path / "state"
    _one_line(finetune(bundle, cases, state), "head.npz", "classifier.weight")
    assert not (state / "outbox").exists() and ledger_lines(state) == []


def test_tampered_active_head_refused_by_infer(micro_out, cases, tmp_path):
    state = tmp_path / "state"
    proc = finetune(micro_out / "bundle", cases, state, "--round-epsilon", "0.1", "--tolerance", "1")
    assert proc.returncode == 0 and json.loads(proc.stdout)["activated"]
    (head,) = (state / "heads").glob("*/head-*.npz")
    head.write_bytes(head.read_bytes()[:-10] + b"0123456789")
    _one_line(run("infer", "--bundle", str(micro_out / "bundle"), "--state", str(state), "--synthetic", "--case-id", "3"), "SHA-256")


def test_help():
    for cmd in ("finetune", "rollback", "status"):
        proc = run(cmd, "--help")
        assert proc.returncode == 0 and "Usage" in proc.stdout


def _resigned(micro_out, dest, key=None, **changes):
    """The micro bundle with manifest members changed, signed again (by ``key``, else the micro key);
    its public key next to it."""
    from edge_runtime.keys import save_public_key

    src = micro_out / "bundle"
    manifest = json.loads((src / MANIFEST).read_text())
    body = {k: v for k, v in manifest.items() if k not in ("files", "signature", "format_version")}
    key = key or load_private_key(micro_out / "signing_key.pem")
    bundle = write_bundle(dest, {name: src / name for name in manifest["files"]}, {**body, **changes}, key)
    save_public_key(key.public_key(), dest.with_name(dest.name + ".pub"))
    return bundle


def test_finetune_trains_on_the_pinned_variant(micro_out, cases, tmp_path):
    """Regression (issue 13): on a PC pinned to fp32 by `profile --select`, finetune embedded with the
    bundle's default variant (INT8 here) and the head was then served on fp32 embeddings."""
    from edge_runtime.bundle import load_bundle
    from edge_runtime.finetune.cache import encoder_key
    from edge_runtime.keys import load_public_key
    from edge_runtime.state import ClinicState

    bundle_dir = _resigned(micro_out, tmp_path / "b", default_variant="int8")
    bundle = load_bundle(bundle_dir, load_public_key(tmp_path / "b.pub"))
    state = ClinicState(tmp_path / "state")
    state.write_pin(bundle, "fp32", {"note": "as profile --select writes it"})
    proc = finetune(bundle_dir, cases, state.root, "--round-epsilon", "0.1")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    fp32 = {v["name"]: v["encoders"] for v in bundle.manifest["variants"]}["fp32"]
    key = encoder_key(bundle.manifest, "fp32", fp32)
    assert [p.name for p in state.cache_dir.iterdir()] == [key[:24]], "the cache holds fp32 embeddings"
    assert report["variant"] == "fp32" and "pinned" in report["variant_reason"] and report["encoder_key"] == key
    assert state.model_for(bundle).variant == "fp32", "served on the variant it was trained on"


def test_ledger_delta_is_the_ledgers_own_in_doctor_status_and_finetune(micro_out, cases, tmp_path):
    """Regression (issue 13): doctor opened every ledger at delta 1e-5 and called a healthy 1e-6 one
    "edited or corrupt"; status did the same unless given --delta."""
    state = tmp_path / "state"
    bundle = micro_out / "bundle"
    first = finetune(bundle, cases, state, "--delta", "1e-6", "--round-epsilon", "0.1")
    assert first.returncode == 0, first.stderr
    status = run("status", "--state", str(state), "--json")
    assert status.returncode == 0, status.stderr
    (d,) = json.loads(status.stdout)["datasets"]
    assert d["delta"] == 1e-6 and d["rounds"] == 1 and d["accountant"] == "rdp"
    doctor = run("doctor", "--state", str(state), "--json")
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["privacy budget (default)"]["ok"], checks
    assert not any("corrupt" in c["detail"] or "edited" in c["detail"] for c in checks.values()), checks
    other = finetune(bundle, cases, state, "--delta", "1e-5", "--round-epsilon", "0.1")
    lines = other.stderr.strip().splitlines()
    assert other.returncode == 1 and len(lines) == 1 and "delta" in lines[0] and "1e-06" in lines[0] and "corrupt" not in lines[0]
    again = finetune(bundle, cases, state, "--round-epsilon", "0.1")  # no --delta: the ledger's
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["privacy"]["delta"] == 1e-6 and len(ledger_lines(state)) == 2


def test_changed_bundle_signer_is_refused_without_trusted_key(micro_out, cases, tmp_path):
    """Issue 14 (10a): the signer key is pinned in the state folder at its first verified use; a
    bundle folder whose BUNDLE.pub was replaced with another key is refused (exit 2, one line)."""
    from edge_runtime.keys import generate_key

    state = tmp_path / "state"
    assert finetune(micro_out / "bundle", cases, state, "--round-epsilon", "0.1").returncode == 0
    assert (state / "signer.pub").read_bytes() == (micro_out / "bundle.pub").read_bytes()
    rogue = _resigned(micro_out, tmp_path / "rogue", key=generate_key())
    probe = ["infer", "--bundle", str(rogue), "--state", str(state), "--synthetic", "--case-id", "3", "--json"]
    refused = run(*probe)
    _one_line(refused, "rogue.pub", "pinned", "--trusted-key")
    accepted = run(*probe, "--trusted-key", str(tmp_path / "rogue.pub"))
    assert accepted.returncode == 0, accepted.stderr
    assert run("infer", "--bundle", str(micro_out / "bundle"), "--state", str(state), "--synthetic", "--case-id", "3").returncode == 0


def test_enrollment_keeps_the_clinic_id_its_ledger_carries(tmp_path):
    """One clinic id: a folder whose id already has a ledger is not enrolled under another name (the
    token is not spent: refused before any request)."""
    from edge_runtime.errors import BadInput
    from edge_runtime.state import ClinicState
    from edge_runtime.sync.client import enroll

    state = ClinicState(tmp_path / "state")
    state.register_dataset("default")
    token = "dwfl1.north." + "s" * 24 + "." + "0" * 64
    with pytest.raises(BadInput, match=f"ask for a token for '{state.clinic_id}'"):
        enroll(state, "http://127.0.0.1:9", token)
    assert not state.sync_dir.exists()
    fresh = ClinicState(tmp_path / "fresh")
    fresh.adopt_enrolled_name("north")
    assert fresh.clinic_id == "north" and fresh.ledger("default").clinic == "north"
