"""Streams harmonized case tensors for training, calibration and evaluation.

Cases are generated (or read) one at a time through the clinic's own preprocessing functions, so
the model trains on exactly what the runtime will feed it; memory holds one batch, not a dataset.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

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
        prepared = prepare_case(case, pre)
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
