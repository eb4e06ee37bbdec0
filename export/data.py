"""Streams harmonized case tensors for training, calibration and evaluation.

Cases are generated (or read) one at a time through the clinic's own preprocessing functions, so
the model trains on exactly what the runtime will feed it; memory holds one batch, not a dataset.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_runtime import MODALITIES
from edge_runtime.preprocess import Preprocessing, prepare_case
from edge_runtime.synthetic import Case, SyntheticCohort


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # zeros where a modality is absent
    mask: torch.Tensor  # (B, 3) float, 1 = present
    labels: torch.Tensor  # (B,) long
    case_ids: list[str]
    risk: torch.Tensor | None = None  # (B,) float, NaN = unknown: the auxiliary (multi-task) target

    def to(self, device: torch.device | str) -> "Batch":
        if str(device) == "cpu":
            return self
        risk = None if self.risk is None else self.risk.to(device)
        return Batch({m: x.to(device) for m, x in self.inputs.items()}, self.mask.to(device), self.labels.to(device),
                     self.case_ids, risk)


def _zeros(pre: Preprocessing) -> dict[str, np.ndarray]:
    t = pre.pathology.tile
    return {
        "ct": np.zeros((1, *pre.ct.grid), np.float32),
        "pathology": np.zeros((3, t, t), np.float32),
        "genomics": np.zeros((len(pre.genomics.genes),), np.float32),
    }


def collate(cases: list[Case], pre: Preprocessing) -> Batch:
    arrays = {m: [] for m in MODALITIES}
    mask = np.zeros((len(cases), len(MODALITIES)), np.float32)
    for row, case in enumerate(cases):
        prepared = prepare_case(case, pre).inputs
        zeros = _zeros(pre)
        for i, m in enumerate(MODALITIES):
            if m in prepared:
                mask[row, i] = 1.0
                # Training uses the first tile; several tiles are averaged in embedding space at inference.
                arrays[m].append(prepared[m][0])
            else:
                arrays[m].append(zeros[m])
    return Batch(
        inputs={m: torch.from_numpy(np.stack(v)) for m, v in arrays.items()},
        mask=torch.from_numpy(mask),
        labels=torch.tensor([c.label for c in cases], dtype=torch.long),
        case_ids=[c.case_id for c in cases],
        risk=torch.tensor([np.nan if c.risk is None else c.risk for c in cases], dtype=torch.float32),
    )


def batches(cohort: SyntheticCohort, pre: Preprocessing, indices: Iterable[int], batch_size: int) -> Iterator[Batch]:
    chunk: list[Case] = []
    for index in indices:
        chunk.append(cohort.case(int(index)))
        if len(chunk) == batch_size:
            yield collate(chunk, pre)
            chunk = []
    if chunk:
        yield collate(chunk, pre)


class PreparedCases:
    """Training cases harmonized once into memory-mapped files, so that every epoch of teacher
    training and distillation reads them back instead of generating and preprocessing them again.
    Writing streams one case at a time; the files, not the process, hold the set."""

    def __init__(self, folder: Path, cohort: SyntheticCohort, pre: Preprocessing, indices: Iterable[int]) -> None:
        indices = list(indices)
        n, zeros = len(indices), _zeros(pre)
        folder.mkdir(parents=True, exist_ok=True)
        self.arrays = {
            m: np.lib.format.open_memmap(folder / f"{m}.npy", mode="w+", dtype=np.float16, shape=(n, *zeros[m].shape))
            for m in MODALITIES
        }
        self.mask = np.zeros((n, len(MODALITIES)), np.float32)
        self.labels = np.zeros(n, np.int64)
        self.risk = np.full(n, np.nan, np.float32)
        self.site = np.full(n, -1, np.int64)  # the synthetic site (federated teacher training), -1 unknown
        self.case_ids: list[str] = []
        for row, index in enumerate(indices):
            case = cohort.case(int(index))
            batch = collate([case], pre)
            self.site[row] = case.site if isinstance(case.site, int) else -1
            for m in MODALITIES:
                self.arrays[m][row] = batch.inputs[m][0].numpy()
            self.mask[row] = batch.mask[0].numpy()
            self.labels[row] = int(batch.labels[0])
            self.risk[row] = float(batch.risk[0])
            self.case_ids.extend(batch.case_ids)
        for arr in self.arrays.values():
            arr.flush()

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(order), batch_size):
            rows = np.sort(order[start : start + batch_size])
            yield Batch(
                inputs={m: torch.from_numpy(arr[rows].astype(np.float32)) for m, arr in self.arrays.items()},
                mask=torch.from_numpy(self.mask[rows]),
                labels=torch.from_numpy(self.labels[rows]),
                case_ids=[self.case_ids[r] for r in rows],
                risk=torch.from_numpy(self.risk[rows]),
            )

    def subset(self, rows: np.ndarray) -> "CaseSubset":
        return CaseSubset(self, np.asarray(rows))


class CaseSubset:
    """Some rows of a PreparedCases (cross-validation folds) without copying them."""

    def __init__(self, cases: PreparedCases, rows: np.ndarray) -> None:
        self.cases, self.rows = cases, rows
        self.labels = cases.labels[rows]
        self.mask = cases.mask[rows]

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[Batch]:
        return self.cases.batches(self.rows[order], batch_size)


class ConcatCases:
    """Several PreparedCases read as one (pooled, centralized training over sites' caches)."""

    def __init__(self, parts: list[PreparedCases]) -> None:
        self.parts = parts
        self.where = [(p, r) for p in parts for r in range(len(p))]
        self.labels = np.concatenate([p.labels for p in parts])
        self.mask = np.concatenate([p.mask for p in parts])

    def __len__(self) -> int:
        return len(self.where)

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(order), batch_size):
            rows = [self.where[i] for i in order[start : start + batch_size]]
            yield Batch(
                inputs={m: torch.from_numpy(np.stack([p.arrays[m][r] for p, r in rows]).astype(np.float32)) for m in MODALITIES},
                mask=torch.from_numpy(np.stack([p.mask[r] for p, r in rows])),
                labels=torch.from_numpy(np.array([p.labels[r] for p, r in rows])),
                case_ids=[p.case_ids[r] for p, r in rows],
                risk=torch.from_numpy(np.array([p.risk[r] for p, r in rows], np.float32)),
            )

