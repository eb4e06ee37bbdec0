"""The whole path through the real CLIs: pipeline -> bundle -> infer / profile without torch."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest

from edge_runtime.bundle import MANIFEST

from .conftest import edge_export, edge_run

VARIANTS = {"fp32", "int8", "int8_ct_stem_fp32", "int8_ct_3d_fp32", "int8_ct_stem_fp32_entropy", "int8_ct_stem_fp32_percentile"}


def test_pipeline_outputs(micro_out):
    report = json.loads((micro_out / "report.json").read_text())
    chosen = report["selection"]["chosen"]
    assert set(report["auc"]) == {"teacher", "student_fp32", "student_int8", f"student_{chosen}"}
    assert all(0.0 <= v <= 1.0 for v in report["auc"].values())
    assert report["sizes_bytes"]["encoders_int8"] < report["sizes_bytes"]["encoders_fp32"]
    assert report["flops"]["teacher"] > report["flops"]["student"] > 0
    assert (micro_out / "report.png").stat().st_size > 1000
    manifest = json.loads((micro_out / "bundle" / MANIFEST).read_text())
    assert manifest["metrics"]["auc"] == report["auc"]
    assert manifest["budgets"] == {"mem_mb": 1800.0, "latency_ms": 200.0}
    assert {v["name"] for v in manifest["variants"]} == VARIANTS
    assert manifest["default_variant"] == chosen and report["selection"]["ok"]
    assert manifest["selection"]["measured_on"]["features"] == report["selection"]["measured_on"]["features"]
    for v in manifest["variants"]:
        m = v["measured"]
        assert m["latency_ms"]["p50"] <= m["latency_ms"]["p95"] and m["peak_rss_mb"] > 10
        assert set(m["stages_ms"]) == {"preprocess", "ct", "pathology", "genomics", "head"}
        assert len(m["latency_ms_by_modalities"]) > 1, "the export measures profile's case mix, not full cases only"
        assert v["passes"] == (not v["fails"])
    fp32_only = {v["name"]: v for v in manifest["variants"]}["int8_ct_3d_fp32"]["fp32_nodes"]["ct"]
    assert len(fp32_only) >= 2, "every 3D convolution of the CT encoder stays FP32"
    # Encoders shared by several variants are stored once.
    stored = [f for f in manifest["files"] if f.startswith("encoders/")]
    used = {p for v in manifest["variants"] for p in v["encoders"].values()}
    assert set(stored) == used and len(stored) < 3 * len(VARIANTS)
    assert manifest["preprocessing"]["ct"]["grid"] == [8, 32, 32]
    assert stat.S_IMODE((micro_out / "signing_key.pem").stat().st_mode) == 0o600
    assert (micro_out / "bundle.pub").is_file()
    assert not [p for p in micro_out.rglob(".*")], "no temporary folders left"
    assert {p.name for p in (micro_out / "work").glob("*.json")} == {"teacher.json", "distill.json", "export.json",
                                                                     "quantize.json", "bundle.json"}


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


def test_every_variant_within_its_stated_parity_bound(micro_out, tmp_path):
    manifest = json.loads((micro_out / "bundle" / MANIFEST).read_text())
    args = ["infer", "--bundle", str(micro_out / "bundle"), "--synthetic", "--json", "--state", str(tmp_path)]
    for i in range(12):
        args += ["--case-id", str(3_000_000 + i)]  # fresh cases, never seen in export
    fp32 = [json.loads(line)["probability"] for line in edge_run(*args, "--variant", "fp32").stdout.splitlines()]
    assert len(fp32) == 12
    for v in manifest["variants"]:
        probs = [json.loads(line)["probability"] for line in edge_run(*args, "--variant", v["name"]).stdout.splitlines()]
        gap = max(abs(a - b) for a, b in zip(probs, fp32))
        assert gap <= v["parity_bound"], (v["name"], gap, v["parity_bound"])


def test_profile_select_pins_a_variant_for_this_pc(micro_out, tmp_path):
    proc = edge_run("profile", "--bundle", str(micro_out / "bundle"), "--select", "--cases", "4", "--json",
                    "--state", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result["figures"]) == VARIANTS and result["ok"]
    # Every variant is measured on the very cases `profile` times: the same modality mix, case for case.
    plain = edge_run("profile", "--bundle", str(micro_out / "bundle"), "--cases", "4", "--json", "--state", str(tmp_path))
    mix = {k: row["cases"] for k, row in json.loads(plain.stdout)["latency_ms_by_modalities"].items()}
    for figures in result["figures"].values():
        assert {k: row["cases"] for k, row in figures["latency_ms_by_modalities"].items()} == mix
    pin = json.loads((tmp_path / "variant.json").read_text())
    assert pin["variant"] == result["chosen"] and pin["cpu"]["features"] is not None
    # Pinning the slowest variant by hand shows that profile and infer follow the pin.
    slowest = max(result["figures"], key=lambda n: result["figures"][n]["model_ms"]["p95"])
    pin["variant"] = slowest
    (tmp_path / "variant.json").write_text(json.dumps(pin))
    prof = edge_run("profile", "--bundle", str(micro_out / "bundle"), "--cases", "3", "--json", "--state", str(tmp_path))
    assert json.loads(prof.stdout)["variant"] == slowest
    assert "pinned" in json.loads(prof.stdout)["variant_reason"]
    # A pin made for another bundle is ignored.
    pin["bundle"] = "0" * 64
    (tmp_path / "variant.json").write_text(json.dumps(pin))
    prof = edge_run("profile", "--bundle", str(micro_out / "bundle"), "--cases", "3", "--json", "--state", str(tmp_path))
    assert "pinned" not in json.loads(prof.stdout)["variant_reason"]


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
    manifest = json.loads((micro_bundle_copy / MANIFEST).read_text())
    name = {v["name"]: v for v in manifest["variants"]}["int8"]["encoders"]["ct"]
    path = micro_bundle_copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    _one_line_error(edge_run("infer", "--bundle", str(micro_bundle_copy), "--synthetic", "--case-id", "1"), Path(name).name, "SHA-256")


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
    for args in ([], ["pipeline"], ["synth"], ["train-teacher"], ["distill"], ["export"], ["quantize"], ["bundle"]):
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
    again = edge_run(*args)
    assert again.returncode == 0, again.stderr
    in_memory = [json.loads(line) for line in again.stdout.splitlines()]
    assert [b["case_id"] for b in in_memory] == [a["case_id"] for a in from_files], "every case predicted from memory too"
    for a, b in zip(from_files, in_memory, strict=True):
        assert a["modalities"] == b["modalities"]
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


def test_pipeline_failed_search_writes_the_best_and_exits_1(tmp_path):
    out = tmp_path / "out"
    proc = edge_export("pipeline", "--out", str(out), "--config", "micro", "--seed", "3", "--latency-budget", "0.01ms")
    assert proc.returncode == 1, proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {out}: no candidate meets every limit") and "p95 latency" in error and "budget 0.01 ms" in error
    report = json.loads((out / "report.json").read_text())
    assert report["selection"]["ok"] is False
    assert all(any("p95 latency" in f for f in c["fails"]) for c in report["candidates"])
    manifest = json.loads((out / "bundle" / MANIFEST).read_text())
    assert manifest["default_variant"] == report["selection"]["chosen"], "the best candidate is still written"


def test_doctor_reports_fitness_and_fails_on_an_impossible_budget(micro_out, tmp_path):
    args = ["doctor", "--bundle", str(micro_out / "bundle"), "--state", str(tmp_path), "--cases", "4", "--json"]
    proc = edge_run(*args)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    names = {c["name"] for c in report["checks"]}
    assert {"CPU", "cores", "RAM", "free disk", "onnxruntime", "variant", "latency p95", "peak memory", "privacy budget"} <= names
    assert report["ok"] and report["cpu"]["class"] in ("vnni", "avx2", "baseline") and report["free_disk_mb"] > 0
    over = edge_run(*args, "--latency-budget", "0.001ms")
    assert over.returncode == 1
    failed = [c for c in json.loads(over.stdout)["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == ["latency p95"] and "budget 0.001 ms" in failed[0]["detail"]
    table = edge_run("doctor", "--bundle", str(micro_out / "bundle"), "--state", str(tmp_path), "--cases", "3")
    assert table.returncode == 0 and "this PC is fit" in table.stdout and "onnxruntime" in table.stdout


def test_profile_plot_writes_a_histogram(micro_out, tmp_path):
    png = tmp_path / "latency.png"
    proc = edge_run("profile", "--bundle", str(micro_out / "bundle"), "--cases", "5", "--plot", str(png), "--json",
                    "--state", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = edge_run("profile", "--bundle", str(micro_out / "bundle"), "--cases", "5", "--plot", str(tmp_path / "no" / "x.png"))
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_measure_accepts_paths_relative_to_the_callers_folder(micro_out, monkeypatch):
    """The demo runs `edge-export pipeline --out demo-out`: candidate paths are relative to its cwd."""
    from edge_runtime import MODALITIES
    from edge_runtime.measure import Request, measure

    manifest = json.loads((micro_out / "bundle" / MANIFEST).read_text())
    monkeypatch.chdir(micro_out.parent)
    rel = Path(micro_out.name) / "bundle"
    fp32 = {v["name"]: v for v in manifest["variants"]}["fp32"]["encoders"]
    figures = measure(Request(str(rel / "head.onnx"), manifest["preprocessing"], manifest["classes"], int(manifest["embedding_dim"]),
                              3, 4, cases=3, encoders={m: str(rel / fp32[m]) for m in MODALITIES}))
    assert figures["cases"] == 3 and figures["peak_rss_mb"] > 10
