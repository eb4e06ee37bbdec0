"""Expression tables (CSV / TSV) -> a vector aligned to the bundle's gene list.

Two layouts are accepted:
- long: a header and one ``gene_id,value`` row per gene;
- wide: a header of gene ids and exactly one row of values (an optional first ``case_id`` /
  ``sample`` column is ignored).
Genes the bundle does not know are ignored; genes the bundle needs but the file lacks, or whose cell
is empty or NaN, come back as NaN (imputed and counted downstream).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from ..errors import BadInput
from ..fsutil import read_text

MAX_BYTES = 64 * 1024 * 1024
MAX_VALUE = float(np.finfo(np.float32).max)  # the vector is float32: anything larger would become inf
ID_COLUMNS = {"case_id", "sample", "sample_id", "id"}
MISSING = {"", "na", "nan", "null"}


def read_expression(path: Path, genes: tuple[str, ...]) -> np.ndarray:
    path = Path(path)
    rows = _rows(path)
    if len(rows) < 2:
        raise BadInput(f"{path}: expression table needs a header and at least one row of values")
    header = [h.strip() for h in rows[0]]
    body = [r for r in rows[1:] if any(c.strip() for c in r)]
    if len(header) == 2 and (len(body) > 1 or header[0].lower() in {"gene", "gene_id", "gene_name", "symbol"}):
        pairs = [(r[0].strip(), r[1] if len(r) > 1 else "") for r in body]
        where = [f"line {i + 2}" for i in range(len(body))]
    elif len(body) == 1:
        values = body[0]
        if len(values) != len(header):
            raise BadInput(f"{path}: the value row has {len(values)} cells, the header {len(header)}")
        keep = [i for i, h in enumerate(header) if h.lower() not in ID_COLUMNS]
        pairs = [(header[i], values[i]) for i in keep]
        where = [f"column {header[i]!r}" for i in keep]
    else:
        raise BadInput(f"{path}: expression table is neither long (gene,value rows) nor wide (one row of values)")
    return _align(path, pairs, where, genes)


def _rows(path: Path) -> list[list[str]]:
    text = read_text(path, "expression file", MAX_BYTES)
    delimiter = "\t" if path.suffix.lower() == ".tsv" or ("\t" in text.split("\n", 1)[0]) else ","
    try:
        return list(csv.reader(text.splitlines(), delimiter=delimiter, strict=True))
    except csv.Error as exc:
        raise BadInput(f"{path}: malformed CSV/TSV ({exc})") from exc


def _align(path: Path, pairs: list[tuple[str, str]], where: list[str], genes: tuple[str, ...]) -> np.ndarray:
    index = {g: i for i, g in enumerate(genes)}
    out = np.full(len(genes), np.nan, dtype=np.float64)
    seen: set[str] = set()
    for (gene, cell), loc in zip(pairs, where):
        if not gene:
            raise BadInput(f"{path}: {loc}: empty gene id")
        if gene in seen:
            raise BadInput(f"{path}: {loc}: gene {gene!r} appears twice")
        seen.add(gene)
        cell = cell.strip()
        if cell.lower() in MISSING:
            continue  # missing: stays NaN, imputed later
        try:
            value = float(cell)
        except ValueError as exc:
            raise BadInput(f"{path}: {loc}: value {cell[:20]!r} for gene {gene!r} is not a number") from exc
        if math.isinf(value) or value < 0:
            raise BadInput(f"{path}: {loc}: value {cell[:20]!r} for gene {gene!r} must be a finite, non-negative expression")
        if value > MAX_VALUE:
            raise BadInput(f"{path}: {loc}: value {cell[:20]!r} for gene {gene!r} is too large (above {MAX_VALUE:.2e})")
        if gene in index:
            out[index[gene]] = value
    if np.isnan(out).all():
        raise BadInput(f"{path}: none of the model's {len(genes)} genes has a value (all genes missing)")
    return out.astype(np.float32)
