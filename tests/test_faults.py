"""Faults on the clinic PC: a full disk (a file-size limit on the process, the same errors a full
disk gives) during writes. Nothing half-written may stay, nothing may be charged twice, and the same
command must work once space is back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime.fsutil import write_atomic

from .conftest import edge_export

LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG like ENOSPC, not a kill
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = [sys.argv[2]] + sys.argv[3:]
if sys.argv[0] == 'edge-run':
    import importlib.abc
    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == 'torch' or name.startswith('torch.'):
                raise ModuleNotFoundError(name)
    sys.meta_path.insert(0, NoTorch())
    from edge_runtime.cli import main
else:
    from tests.test_faults import write_big as main
main()
"""


def write_big() -> None:
    write_atomic(Path(sys.argv[1]), b"x" * 1_000_000)


def limited(limit: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LIMITED, str(limit), *args], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    proc = limited(100_000, "write_big", str(target))
    assert proc.returncode != 0 and "File too large" in proc.stderr
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"], "no temporary file left"


@pytest.fixture(scope="module")
def labelled_cases(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "cases"
    proc = edge_export("synth", "--out", str(out), "--config", "micro", "--seed", "3", "--cases", "60", "--start", "5000")
    assert proc.returncode == 0, proc.stderr
    return out / "manifest.csv"


def test_finetune_on_a_full_disk_fails_cleanly_then_works(micro_out, labelled_cases, tmp_path):
    state = tmp_path / "state"
    args = ["edge-run", "finetune", "--bundle", str(micro_out / "bundle"), "--manifest", str(labelled_cases),
            "--state", str(state), "--seed", "1", "--json", "--round-epsilon", "0.2"]
    full = limited(5_000, *args)  # the embedding cache (192 bytes a case here) outgrows it
    assert full.returncode == 3, full.stderr
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and "disk full or file size limit" in lines[0]
    assert not (state / "privacy" / "default" / "ledger.jsonl").exists(), "nothing charged"
    assert not list(state.glob("outbox/*")), "no update"
    again = limited(2**40, *args)
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["cases"]["train"] + report["cases"]["validation"] == 60
    ledger = (state / "privacy" / "default" / "ledger.jsonl").read_text().splitlines()
    assert len(ledger) == 1 and len(list(state.glob("outbox/*.npz"))) == 1


def test_sweep_removes_only_dead_processes_temporaries(tmp_path):
    """What a kill -9 leaves (a hidden temporary of a dead process) goes at the next start; a live
    process's temporary, another host's and ordinary files stay."""
    from edge_runtime.fsutil import _HOST, sweep_temps, temp_path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "sub").mkdir()
    leftovers = [tmp_path / f".a.bin.tmp-{_HOST}-{dead.pid}-0a1b2c3d", tmp_path / "sub" / f".v2.old-{_HOST}-{dead.pid}-00ff00ff"]
    leftovers[0].write_bytes(b"half")
    leftovers[1].mkdir()
    (leftovers[1] / "x.onnx").write_bytes(b"old version")
    keep = [temp_path(tmp_path / "b.bin"), tmp_path / f".c.bin.tmp-otherhost-{dead.pid}-0a1b2c3d", tmp_path / "model.bin",
            tmp_path / ".hidden"]
    for p in keep:
        p.write_bytes(b"x")
    assert sweep_temps(tmp_path) == 2
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in keep)
    assert sweep_temps(tmp_path / "missing") == 0


def test_disk_full_during_a_ledger_charge_then_status_and_finetune_work(micro_out, labelled_cases, tmp_path):
    """Regression (issue 14): a short os.write of the ledger line was ignored, the head record counted
    the cut line and every later finetune / sync / status said "ledger entry is corrupt". Now the
    append is whole or cut back: exit 3, the ledger as before, and the next runs work."""
    state = tmp_path / "state"
    args = ["edge-run", "finetune", "--bundle", str(micro_out / "bundle"), "--manifest", str(labelled_cases),
            "--state", str(state), "--seed", "1", "--json", "--round-epsilon", "0.1"]
    first = limited(2**40, *args)
    assert first.returncode == 0, first.stderr
    ledger = state / "privacy" / "default" / "ledger.jsonl"
    before = ledger.read_bytes()
    # Every other file the second run writes before its charge is smaller than this; the ledger line
    # crosses it mid-way: the kernel writes part of it, then refuses (EFBIG, as ENOSPC on a full disk).
    full = limited(len(before) + len(before) // 2, *args)
    assert full.returncode == 3, (full.returncode, full.stderr)
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and "disk full or file size limit" in lines[0] and "ledger.jsonl" in lines[0], full.stderr
    assert ledger.read_bytes() == before, "no partial line left behind"
    status = limited(2**40, "edge-run", "status", "--state", str(state), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["datasets"][0]["rounds"] == 1
    again = limited(2**40, *args)
    assert again.returncode == 0, again.stderr
    assert len(ledger.read_text().splitlines()) == 2 and len(list(state.glob("outbox/*.npz"))) == 2
