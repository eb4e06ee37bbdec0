"""The whole path through the real CLIs: pipeline -> bundle -> infer / profile without torch."""

from __future__ import annotations

import json
import shutil
import stat

import pytest

from edge_runtime.bundle import MANIFEST

from .conftest import edge_export, edge_run


def test_pipeline_outputs(micro_out):
    report = json.loads((micro_out / "report.json").read_text())
    assert set(report["auc"]) == {"teacher", "student_fp32", "student_int8"}
    assert all(0.0 <= v <= 1.0 for v in report["auc"].values())
    assert report["sizes_bytes"]["encoders_int8"] < report["sizes_bytes"]["encoders_fp32"]
    manifest = json.loads((micro_out / "bundle" / MANIFEST).read_text())
    assert manifest["metrics"]["auc"] == report["auc"]
    assert manifest["budgets"] == {"mem_mb": 1800.0, "latency_ms": 200.0}
    assert {v["name"] for v in manifest["variants"]} == {"int8", "fp32"}
    assert manifest["preprocessing"]["ct"]["grid"] == [8, 32, 32]
    assert stat.S_IMODE((micro_out / "signing_key.pem").stat().st_mode) == 0o600
    assert (micro_out / "bundle.pub").is_file()
    assert not [p for p in micro_out.iterdir() if p.name.startswith(".")], "no work folders left"


def test_infer_without_torch(micro_out):
    proc = edge_run("infer", "--bundle", str(micro_out / "bundle"), "--synthetic",
                    "--case-id", "case-000007", "--case-id", "12", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["case_id"] for r in rows] == ["case-000007", "case-000012"]
    for r in rows:
        assert set(r) == {"case_id", "probability", "label", "modalities", "latency_ms"}
        assert 0.0 <= r["probability"] <= 1.0 and r["label"] in ("negative", "positive")
        assert r["modalities"] and r["latency_ms"] > 0
    again = edge_run("infer", "--bundle", str(micro_out / "bundle"), "--synthetic", "--case-id", "7", "--json")
    assert json.loads(again.stdout)["probability"] == rows[0]["probability"], "deterministic"


def test_fp32_variant_agrees_with_int8(micro_out):
    args = ["infer", "--bundle", str(micro_out / "bundle"), "--synthetic", "--json"]
    for i in range(5):
        args += ["--case-id", str(100 + i)]
    int8 = [json.loads(line)["probability"] for line in edge_run(*args).stdout.splitlines()]
    fp32 = [json.loads(line)["probability"] for line in edge_run(*args, "--variant", "fp32").stdout.splitlines()]
    assert len(int8) == len(fp32) == 5
    assert max(abs(a - b) for a, b in zip(int8, fp32)) < 0.15


def test_profile_without_torch(micro_out):
    proc = edge_run("profile", "--bundle", str(micro_out / "bundle"), "--cases", "6", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report["latency_ms"]) == {"p50", "p95", "p99"}
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p95"] <= report["latency_ms"]["p99"]
    assert report["budgets"] == {"mem_mb": 1800.0, "latency_ms": 200.0}
    assert report["pass"] is True and report["cases"] == 6
    assert 30 < report["peak_rss_mb"] < 1800


def test_profile_over_budget_exits_1(micro_out):
    proc = edge_run("profile", "--bundle", str(micro_out / "bundle"), "--cases", "3", "--latency-budget", "1us", "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["pass"] is False
    proc = edge_run("profile", "--bundle", str(micro_out / "bundle"), "--cases", "3", "--mem-budget", "1MB")
    assert proc.returncode == 1 and "OVER BUDGET" in proc.stdout


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0]
    assert proc.stdout == ""


def test_bad_budget_is_one_line_exit_2(micro_out):
    _one_line_error(edge_run("profile", "--bundle", str(micro_out / "bundle"), "--mem-budget", "lots"), "memory budget", "lots")
    _one_line_error(edge_run("profile", "--bundle", str(micro_out / "bundle"), "--latency-budget", "200"), "latency budget")


def test_tampered_encoder_refused(micro_bundle_copy):
    path = micro_bundle_copy / "encoders" / "int8" / "ct.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    _one_line_error(edge_run("infer", "--bundle", str(micro_bundle_copy), "--synthetic", "--case-id", "1"), "ct.onnx", "SHA-256")


def test_tampered_manifest_refused(micro_bundle_copy):
    manifest = json.loads((micro_bundle_copy / MANIFEST).read_text())
    manifest["budgets"]["latency_ms"] = 1e9
    (micro_bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    _one_line_error(edge_run("profile", "--bundle", str(micro_bundle_copy)), "signature is invalid")


def test_wrong_key_and_missing_bundle_refused(micro_bundle_copy, micro_out, tmp_path):
    other = tmp_path / "other.pub"
    from edge_runtime.keys import generate_key, save_public_key

    save_public_key(generate_key().public_key(), other)
    _one_line_error(edge_run("infer", "--bundle", str(micro_bundle_copy), "--trusted-key", str(other),
                             "--synthetic", "--case-id", "1"), "not by the trusted key")
    _one_line_error(edge_run("infer", "--bundle", str(tmp_path / "nope"), "--trusted-key", str(micro_out / "bundle.pub"),
                             "--synthetic", "--case-id", "1"), "does not exist")
    shutil.copy(micro_out / "bundle.pub", tmp_path / "x.pub")
    (micro_bundle_copy / "head.onnx").unlink()
    _one_line_error(edge_run("infer", "--bundle", str(micro_bundle_copy), "--synthetic", "--case-id", "1"), "head.onnx", "missing")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--synthetic"], "either --manifest"),
        (["--case-id", "3"], "needs --synthetic"),
        (["--synthetic", "--case-id", "patient-x"], "patient-x"),
        (["--manifest", "nowhere.csv"], "nowhere.csv"),
    ],
)
def test_bad_infer_arguments(micro_out, args, needle):
    _one_line_error(edge_run("infer", "--bundle", str(micro_out / "bundle"), *args), needle)


def test_pipeline_bad_key_writes_nothing(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    out = tmp_path / "out"
    _one_line_error(edge_export("pipeline", "--out", str(out), "--config", "micro", "--signing-key", str(bad)), "bad.pem")
    assert not out.exists()


def test_unavailable_device_refused(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal cannot happen here")
    out = tmp_path / "out"
    _one_line_error(edge_export("pipeline", "--out", str(out), "--config", "micro", "--device", "cuda"), "no CUDA device")
    _one_line_error(edge_export("train-teacher", "--out", str(out), "--config", "micro", "--device", "tpu9"), "not a torch device")
    assert not out.exists()


def test_help_everywhere():
    for args in ([], ["infer"], ["profile"]):
        proc = edge_run(*args, "--help", block_torch=True)
        assert proc.returncode == 0 and "Usage" in proc.stdout
    for args in ([], ["pipeline"], ["synth"], ["train-teacher"]):
        proc = edge_export(*args, "--help")
        assert proc.returncode == 0 and "Usage" in proc.stdout


@pytest.fixture(scope="session")
def micro_cases(tmp_path_factory):
    """Real case files (DICOM series, PNG, CSV) + manifest for the micro bundle's cohort."""
    out = tmp_path_factory.mktemp("cases") / "cases"
    proc = edge_export("synth", "--out", str(out), "--config", "micro", "--seed", "3", "--cases", "6")
    assert proc.returncode == 0, proc.stderr
    return out


def test_infer_manifest_of_real_files_matches_in_memory_cases(micro_out, micro_cases):
    proc = edge_run("infer", "--bundle", str(micro_out / "bundle"), "--manifest", str(micro_cases / "manifest.csv"), "--json")
    assert proc.returncode == 0, proc.stderr
    from_files = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(from_files) == 6 and not any(r.get("rejected") for r in from_files)
    args = ["infer", "--bundle", str(micro_out / "bundle"), "--synthetic", "--json"]
    for r in from_files:
        args += ["--case-id", r["case_id"]]
    in_memory = [json.loads(line) for line in edge_run(*args).stdout.splitlines()]
    for a, b in zip(from_files, in_memory):
        assert a["case_id"] == b["case_id"] and a["modalities"] == b["modalities"]
        assert abs(a["probability"] - b["probability"]) < 0.02


def test_manifest_bad_case_rejected_others_go_on(micro_out, micro_cases):
    lines = (micro_cases / "manifest.csv").read_text().splitlines()
    broken = micro_cases / "broken.png"
    broken.write_bytes(b"not a png")
    lines.append("bad-1,,broken.png,,,0")
    lines.append("bad-2,,../../etc/passwd,,,0")
    (micro_cases / "mixed.csv").write_text("\n".join(lines) + "\n")
    proc = edge_run("infer", "--bundle", str(micro_out / "bundle"), "--manifest", str(micro_cases / "mixed.csv"), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["case_id"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert len(rows) == 8
    assert rows["bad-1"]["rejected"] and "broken.png: not a readable image" in rows["bad-1"]["reason"]
    assert rows["bad-2"]["rejected"] and "outside the manifest's folder" in rows["bad-2"]["reason"]
    assert sum(1 for r in rows.values() if "probability" in r) == 6


def test_single_unusable_case_exits_2(micro_out, micro_cases):
    (micro_cases / "one.csv").write_text("case_id,ct\nonly,ct/missing-series\n")
    proc = edge_run("infer", "--bundle", str(micro_out / "bundle"), "--manifest", str(micro_cases / "one.csv"))
    assert proc.returncode == 2
    assert "REJECTED" in proc.stdout and "does not exist" in proc.stdout
    assert proc.stderr.strip().startswith("error: no case could be predicted")
