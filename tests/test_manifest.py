"""Manifests on real files: the synthetic writer's DICOM/NIfTI/PNG/CSV read back through the clinic path."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edge_runtime.errors import BadInput
from edge_runtime.manifest import load_case, read_manifest
from edge_runtime.synthetic import SynthConfig, SyntheticCohort
from export.config import MICRO
from export.stats import fit_preprocessing
from export.synth_files import write_cohort

CLASSES = ["negative", "positive"]


@pytest.fixture(scope="module")
def cohort():
    return SyntheticCohort(SynthConfig(seed=4, spec=MICRO.input))


@pytest.fixture(scope="module")
def pre(cohort):
    return fit_preprocessing(cohort.iter_cases(0, 16), MICRO.input)


@pytest.mark.parametrize("ct_format", ["dicom", "nifti"])
def test_written_cohort_reads_back(tmp_path, cohort, pre, ct_format):
    manifest = read_manifest(write_cohort(cohort, tmp_path, 50, 8, CLASSES, ct_format))
    assert [e.case_id for e in manifest.entries] == [f"case-{i:06d}" for i in range(50, 58)]
    assert any(not e.ct for e in manifest.entries) or any(not e.genomics for e in manifest.entries) or True
    for entry, original in zip(manifest.entries, cohort.iter_cases(50, 8)):
        case = load_case(entry, manifest.folder, pre, CLASSES)
        assert case.modalities == original.modalities and case.label == original.label
        if original.ct is not None:
            # DICOM stores whole HU from -1024 up; below the soft-tissue window that does not matter.
            inside = original.ct > -1000
            assert np.allclose(case.ct[inside], original.ct[inside], atol=0.51)
        if original.tiles:
            assert np.array_equal(case.tiles[0], original.tiles[0])
        if original.genomics is not None:
            assert np.allclose(case.genomics, original.genomics, rtol=1e-5, atol=1e-4)


def test_some_cases_miss_modalities(tmp_path, cohort):
    manifest = read_manifest(write_cohort(cohort, tmp_path, 0, 30, CLASSES))
    assert any(not (e.ct and e.pathology and e.genomics) for e in manifest.entries)


def test_cohort_from_one_site(tmp_path, cohort):
    """`edge-export synth --site K`: every case of one site (one clinic's data), same ids as without."""
    manifest = read_manifest(write_cohort(cohort, tmp_path, 0, 12, CLASSES, site=2))
    assert {e.site for e in manifest.entries} == {"2"}
    assert [e.case_id for e in manifest.entries] == [c.case_id for c in cohort.iter_cases(0, 12)]
    assert [e.label for e in manifest.entries] == [CLASSES[c.label] for c in cohort.iter_cases(0, 12, site=2)]


def test_synth_refuses_a_site_the_cohort_lacks(tmp_path):
    from click.testing import CliRunner

    from export.cli import main

    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "x"), "--sites", "3", "--site", "3", "--config", "micro"])
    assert result.exit_code == 2 and "--site 3" in result.output


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_with_tile_list_and_per_case_problems(tmp_path, cohort, pre):
    written = read_manifest(write_cohort(cohort, tmp_path, 0, 6, CLASSES))
    tile = next(e.pathology for e in written.entries if e.pathology)
    rows = [
        {"case_id": "a", "pathology": [tile, tile], "label": "positive"},
        {"case_id": "b", "genomics": "../outside.csv"},
        {"case_id": "a", "genomics": "genomics/x.csv"},
        {"case_id": "c"},
        {"case_id": "d", "pathology": tile, "label": "maybe"},
        {"case_id": "e", "ct": "ct/none"},
    ]
    manifest = read_manifest(_jsonl(tmp_path / "m.jsonl", rows))
    outcome = {}
    for entry in manifest.entries:
        try:
            outcome[entry.case_id + str(entry.line)] = load_case(entry, manifest.folder, pre, CLASSES)
        except BadInput as exc:
            outcome[entry.case_id + str(entry.line)] = str(exc)
    assert len(outcome["a1"].tiles) == 2 and outcome["a1"].label == 1
    assert "outside the manifest's folder" in outcome["b2"]
    assert "appears twice" in outcome["a3"]
    assert "no modality given" in outcome["c4"]
    assert "label 'maybe'" in outcome["d5"]
    assert "ct/none: CT file or folder does not exist" in outcome["e6"]


@pytest.mark.parametrize(
    "name,content,needle",
    [
        ("m.csv", None, "does not exist"),
        ("m.csv", "id,ct\n1,x\n", "no case_id column"),
        ("m.csv", "case_id,ct\n", "lists no cases"),
        ("m.csv", b"\xff\xfe\x00bad", "not UTF-8"),
        ("m.jsonl", "", "lists no cases"),
    ],
)
def test_bad_manifest_refused(tmp_path, name, content, needle):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(BadInput, match=needle):
        read_manifest(path)


def test_jsonl_garbage_line_is_a_case_problem(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"case_id": "a", "ct": "x"}\nnot json\n[1,2]\n')
    problems = [e.problem for e in read_manifest(path).entries]
    assert problems == ["", "line 2 is not valid JSON", "line 3 is not a JSON object"]


def test_link_inside_a_named_folder_that_leaves_it_rejects_the_case(tmp_path, cohort, pre):
    # Regression (issue 14 item 8): the containment check looked at the named folder only; the
    # readers' directory walks followed a file link inside it to anywhere.
    site = tmp_path / "site"
    written = read_manifest(write_cohort(cohort, site, 0, 6, CLASSES))
    ct_entry = next(e for e in written.entries if e.ct)
    tile = site / next(e.pathology for e in written.entries if e.pathology)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    slices = sorted((site / ct_entry.ct).iterdir())
    slices[2].rename(outside / slices[2].name)  # the slice now lives outside, a link takes its place
    slices[2].symlink_to(outside / slices[2].name)
    shutil.copy(tile, outside / "t.png")
    other_ct = next(e for e in written.entries if e.ct and e.ct != ct_entry.ct)
    (site / other_ct.ct / "more").symlink_to(outside, target_is_directory=True)  # a linked folder that leaves
    (site / "tiles_out").mkdir()
    (site / "tiles_out" / "b.png").symlink_to(outside / "t.png")
    (site / "tiles_in").mkdir()  # a link that stays inside the manifest's folder is fine
    (site / "tiles_in" / "a.png").symlink_to(tile)
    rows = [
        {"case_id": "ct", "ct": ct_entry.ct},
        {"case_id": "ct-dir", "ct": other_ct.ct},
        {"case_id": "out", "pathology": "tiles_out"},
        {"case_id": "in", "pathology": "tiles_in"},
    ]
    manifest = read_manifest(_jsonl(site / "m.jsonl", rows))
    outcome = {}
    for entry in manifest.entries:
        try:
            outcome[entry.case_id] = load_case(entry, manifest.folder, pre, CLASSES)
        except BadInput as exc:
            outcome[entry.case_id] = str(exc)
    assert f"{slices[2].name}: links to " in outcome["ct"] and "outside the manifest's folder" in outcome["ct"]
    assert "more: links to " in outcome["ct-dir"] and "outside the manifest's folder" in outcome["ct-dir"]
    assert "b.png: links to " in outcome["out"] and "outside the manifest's folder" in outcome["out"]
    assert len(outcome["in"].tiles) == 1
