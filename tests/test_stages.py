"""The export pipeline as stages over one work folder (DESIGN §9): run one by one they give what
`pipeline` gives; quantize + bundle rerun with another recipe reuse the trained student; a stage
refuses missing or foreign inputs in one line before any work."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from edge_runtime.bundle import load_bundle
from edge_runtime.keys import load_public_key

from .conftest import edge_export, edge_run

MICRO = ("--config", "micro", "--seed", "3")  # the micro_out fixture's
TRAINED = ("teacher/federated.pt", "teacher/preprocessing.json", "teacher.json", "student.pt", "distill.json",
           "onnx/ct.onnx", "onnx/pathology.onnx", "onnx/genomics.onnx", "onnx/head.onnx", "onnx/head.npz", "export.json")


def _copy(micro_out: Path, tmp_path: Path) -> Path:
    """A private copy of the pipeline's output folder: work folder (mtimes kept) and signing key."""
    out = tmp_path / "out"
    shutil.copytree(micro_out / "work", out / "work")
    shutil.copy2(micro_out / "signing_key.pem", out / "signing_key.pem")
    return out


def _state(work: Path, names) -> dict[str, tuple[str, int]]:
    return {n: (hashlib.sha256((work / n).read_bytes()).hexdigest(), (work / n).stat().st_mtime_ns) for n in names}


def _one_line_error(proc, *needles) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _probability(bundle: Path, key: Path, variant: str, state: Path) -> float:
    proc = edge_run("infer", "--bundle", str(bundle), "--trusted-key", str(key), "--variant", variant, "--synthetic",
                    "--case-id", "3000001", "--json", "--state", str(state))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["probability"]


def test_quantize_and_bundle_rerun_with_another_recipe_reuse_the_student(micro_out, tmp_path):
    out = _copy(micro_out, tmp_path)
    work = out / "work"
    before = _state(work, TRAINED)
    quant = edge_export("quantize", "--work", str(work), *MICRO, "--variants", "int8_ct_3d_fp32", "--tolerance", "0.02", "--json")
    assert quant.returncode == 0, quant.stderr[-3000:]
    record = json.loads(quant.stdout)
    assert record["options"]["variants"] == ["fp32", "int8_ct_3d_fp32"] and record["options"]["tolerance"] == 0.02
    bundle = edge_export("bundle", "--work", str(work), *MICRO)
    assert bundle.returncode == 0, bundle.stderr[-3000:]
    for proc in (quant, bundle):  # nothing trained: no teacher round, no student epoch
        assert " epoch " not in proc.stdout + proc.stderr and "round " not in proc.stdout + proc.stderr
    assert _state(work, TRAINED) == before, "teacher, student and ONNX files neither rewritten nor touched"
    # The rerun's bundle verifies against the key clinics already pinned (the earlier run's signer is kept).
    assert (out / "bundle.pub").read_bytes() == (micro_out / "bundle.pub").read_bytes()
    manifest = load_bundle(out / "bundle", load_public_key(micro_out / "bundle.pub")).manifest
    assert {v["name"] for v in manifest["variants"]} == {"fp32", "int8_ct_3d_fp32"}
    assert manifest["selection"]["tolerance"] == 0.02 and manifest["default_variant"] in ("fp32", "int8_ct_3d_fp32")
    report = json.loads((out / "report.json").read_text())
    assert report["auc"] == manifest["metrics"]["auc"] and (out / "checkpoints.pt").is_file()
    # The same student: its FP32 variant answers exactly as the pipeline's bundle does.
    key = micro_out / "bundle.pub"
    assert _probability(out / "bundle", key, "fp32", tmp_path) == _probability(micro_out / "bundle", key, "fp32", tmp_path)


def test_stage_with_missing_input_refuses_in_one_line(micro_out, tmp_path):
    empty = tmp_path / "empty" / "work"
    for stage in ("distill", "export", "quantize", "bundle"):
        _one_line_error(edge_export(stage, "--work", str(empty), *MICRO), f"{empty}/teacher.json is missing",
                        f"edge-export train-teacher --work {empty}")
    assert not empty.exists(), "nothing written by a refused stage"
    work = _copy(micro_out, tmp_path) / "work"
    (work / "student.pt").unlink()
    _one_line_error(edge_export("export", "--work", str(work), *MICRO), f"{work}/student.pt is missing", "edge-export distill")
    shutil.copy2(micro_out / "work" / "student.pt", work / "student.pt")
    (work / "quantize.json").unlink()
    _one_line_error(edge_export("bundle", "--work", str(work), *MICRO), f"{work}/quantize.json is missing", "edge-export quantize")
    with open(work / "onnx" / "ct.onnx", "ab") as fh:
        fh.write(b"\0")
    line = _one_line_error(edge_export("quantize", "--work", str(work), *MICRO), "ct.onnx changed since export wrote it")
    assert "edge-export export" in line


def test_work_folder_from_another_seed_or_config_refused(micro_out, tmp_path):
    work = _copy(micro_out, tmp_path) / "work"
    before = _state(work, TRAINED)
    _one_line_error(edge_export("quantize", "--work", str(work), "--config", "micro", "--seed", "4"),
                    "made with --config micro --seed 3, not --config micro --seed 4")
    _one_line_error(edge_export("bundle", "--work", str(work), "--config", "tiny", "--seed", "3"),
                    "made with --config micro --seed 3, not --config tiny --seed 3")
    assert _state(work, TRAINED) == before and (work / "quantize.json").is_file() and not (tmp_path / "out" / "bundle").exists()
    # train-teacher: the simulation (--out) or the pipeline's stage (--work), and the simulation's options only with --out.
    _one_line_error(edge_export("train-teacher", "--work", str(work), *MICRO, "--sites", "3"), "--sites", "simulation")
    _one_line_error(edge_export("train-teacher", *MICRO), "either --out", "or --work")


def test_stages_one_by_one_give_what_pipeline_gives(micro_out, tmp_path):
    work = tmp_path / "out" / "work"
    for stage, *extra in (("train-teacher",), ("distill",), ("export",), ("quantize", "--variants", "fp32"), ("bundle",)):
        proc = edge_export(stage, "--work", str(work), *MICRO, *extra)
        assert proc.returncode == 0, (stage, proc.stderr[-3000:])
    for stage in ("distill", "export"):  # each stage seeds itself: the same student, the same ONNX files
        ours, pipeline = (json.loads((w / f"{stage}.json").read_text())["outputs"] for w in (work, micro_out / "work"))
        assert ours == pipeline, stage
    teacher = json.loads((work / "teacher.json").read_text())
    assert {"teacher/federated.pt", "teacher/rounds.jsonl", "teacher/preprocessing.json"} == set(teacher["outputs"])
    assert teacher["facts"] == json.loads((micro_out / "work" / "teacher.json").read_text())["facts"]
    proc = edge_run("infer", "--bundle", str(tmp_path / "out" / "bundle"), "--synthetic", "--case-id", "7", "--json")
    assert proc.returncode == 0, proc.stderr  # signed with the new key saved next to it
    assert (tmp_path / "out" / "signing_key.pem").is_file()
