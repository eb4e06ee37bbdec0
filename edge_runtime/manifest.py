"""Case manifests (CSV or JSONL): ``case_id, ct, pathology, genomics, label, site``.

Paths are relative to the manifest's folder and must stay inside it, and so must every file a
named folder holds once links are followed (a link that leaves the folder rejects the case). ``pathology`` may list several
tiles separated by ``;`` or name a folder of tiles. Whole-file problems (missing, unreadable, no
``case_id`` column) refuse the manifest; problems of one case reject that case with a reason and the
others go on.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import MODALITIES
from .errors import BadInput
from .fsutil import read_text
from .preprocess import Preprocessing
from .readers.ct import TargetGrid, read_ct
from .readers.genomics import read_expression
from .readers.pathology import read_tiles
from .synthetic import Case

COLUMNS = ("case_id", "ct", "pathology", "genomics", "label", "site")
MAX_MANIFEST_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ManifestEntry:
    case_id: str
    line: int
    ct: str = ""
    pathology: str = ""
    genomics: str = ""
    label: str = ""
    site: str = ""
    problem: str = ""  # set when the row itself is unusable


@dataclass
class Manifest:
    path: Path
    entries: list[ManifestEntry] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.path.parent


def read_manifest(path: Path) -> Manifest:
    path = Path(path)
    text = read_text(path, "manifest", MAX_MANIFEST_BYTES)
    rows = _jsonl_rows(path, text) if path.suffix.lower() in (".jsonl", ".ndjson") else _csv_rows(path, text)
    manifest, seen = Manifest(path.resolve()), set()  # rows streamed: memory holds the entries, not every row dict too
    for line, row in rows:
        problem = row.pop("__problem__", "")
        case_id = str(row.get("case_id") or "").strip()
        if not problem and not case_id:
            problem = "case_id is empty"
        elif not problem and case_id in seen:
            problem = f"case_id {case_id!r} appears twice in the manifest"
        seen.add(case_id)
        values = {k: str(row.get(k) or "").strip() for k in COLUMNS[1:]}
        if not problem and not any(values[m] for m in MODALITIES):
            problem = "no modality given (ct, pathology and genomics are all empty)"
        manifest.entries.append(ManifestEntry(case_id=case_id or f"line-{line}", line=line, problem=problem, **values))
    if not manifest.entries:
        raise BadInput(f"{path}: manifest lists no cases")
    return manifest


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    try:
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ",", strict=True)
        if not reader.fieldnames or "case_id" not in [f.strip() for f in reader.fieldnames]:
            raise BadInput(f"{path}: manifest header has no case_id column (expected {', '.join(COLUMNS)})")
        for row in reader:
            clean = {str(k).strip(): v for k, v in row.items() if k is not None}
            if None in row:
                clean["__problem__"] = "row has more cells than the header"
            yield reader.line_num, clean
    except csv.Error as exc:
        raise BadInput(f"{path}: malformed CSV ({exc})") from exc


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            yield line_no, {"__problem__": f"line {line_no} is not valid JSON"}
            continue
        if not isinstance(row, dict):
            yield line_no, {"__problem__": f"line {line_no} is not a JSON object"}
            continue
        if isinstance(row.get("pathology"), list):
            row["pathology"] = ";".join(str(p) for p in row["pathology"])
        yield line_no, row


def resolve(folder: Path, value: str) -> Path:
    """A manifest path, relative to the manifest's folder; refuses paths that leave that folder."""
    candidate = (folder / value).resolve()
    if not candidate.is_relative_to(folder):
        raise BadInput(f"{value}: path is outside the manifest's folder {folder}")
    return candidate


def parse_label(text: str, classes: list[str]) -> int:
    """'' -> -1 (unknown); a class name or its index -> the index."""
    if not text:
        return -1
    if text in classes:
        return classes.index(text)
    if text.isdigit() and int(text) < len(classes):
        return int(text)
    raise BadInput(f"label {text!r} is not one of {', '.join(classes)} or 0..{len(classes) - 1}")


def load_case(entry: ManifestEntry, folder: Path, pre: Preprocessing, classes: list[str]) -> Case:
    """Read every modality the entry names; any unusable file rejects the case (BadInput)."""
    if entry.problem:
        raise BadInput(entry.problem)
    case = Case(case_id=entry.case_id, site=entry.site, label=parse_label(entry.label, classes))
    if entry.ct:
        case.ct = read_ct(resolve(folder, entry.ct), TargetGrid(pre.ct.grid, pre.ct.spacing_mm), within=folder)
        case.ct_spacing = pre.ct.spacing_mm  # the reader already resampled to the bundle grid
    if entry.pathology:
        tiles = []
        for part in (p.strip() for p in entry.pathology.split(";")):
            if part:
                tiles.extend(read_tiles(resolve(folder, part), within=folder))
        case.tiles = tiles
    if entry.genomics:
        case.genomics = read_expression(resolve(folder, entry.genomics), pre.genomics.genes)
    return case
