"""Centralized teacher training and student distillation (DESIGN §3).

Teacher loss: cross-entropy + contrastive alignment of the modalities of one case.
Student loss: (1 - alpha) * CE(label) + alpha * T^2 * KL(teacher_T || student_T)
              + feature matching (MSE) of the shared-space embeddings of present modalities.
Both use modality dropout, so every non-empty subset of modalities is seen in training.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .config import TrainConfig
from .data import Batch, PreparedCases
from .models import Student, Teacher

Log = Callable[[str], None]


def drop_modalities(mask: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Randomly hide present modalities with probability ``p``; a case always keeps at least one."""
    keep = (torch.rand(mask.shape, generator=gen) >= p).float() * mask
    empty = keep.sum(1) == 0
    keep[empty] = mask[empty]
    return keep


def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, 7, epoch]).permutation(n)


def train_teacher(teacher: Teacher, data: PreparedCases, cfg: TrainConfig, seed: int, log: Log) -> Teacher:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(teacher.parameters(), lr=cfg.lr, weight_decay=1e-4)
    teacher.train()
    for epoch in range(cfg.teacher_epochs):
        total, n = 0.0, 0
        for batch in data.batches(_epoch_order(len(data), seed, epoch), cfg.batch_size):
            mask = drop_modalities(batch.mask, cfg.modality_dropout, gen)
            logits, emb = teacher(batch.inputs, mask)
            # Alignment sees all present modalities: dropout is for the classifier's robustness.
            align = teacher.alignment.loss(teacher.embed(batch.inputs, batch.mask), batch.mask) if cfg.contrastive_weight else 0.0
            loss = F.cross_entropy(logits, batch.labels) + cfg.contrastive_weight * align
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(batch.labels), n + len(batch.labels)
        log(f"teacher epoch {epoch + 1}/{cfg.teacher_epochs}: loss {total / max(n, 1):.4f}")
    teacher.eval()
    return teacher


def distillation_loss(
    s_logits: torch.Tensor, s_emb: torch.Tensor, t_logits: torch.Tensor, t_emb: torch.Tensor,
    labels: torch.Tensor, mask: torch.Tensor, cfg: TrainConfig,
) -> torch.Tensor:
    temp = cfg.kd_temperature
    kl = F.kl_div(F.log_softmax(s_logits / temp, -1), F.softmax(t_logits / temp, -1), reduction="batchmean") * temp**2
    ce = F.cross_entropy(s_logits, labels)
    feat = (((s_emb - t_emb) ** 2).mean(-1) * mask).sum() / mask.sum().clamp(min=1.0)
    return (1 - cfg.kd_alpha) * ce + cfg.kd_alpha * kl + cfg.feature_weight * feat


def distill(student: Student, teacher: Teacher, data: PreparedCases, cfg: TrainConfig, seed: int, log: Log) -> Student:
    torch.manual_seed(seed + 1)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=1e-4)
    teacher.eval()
    student.train()
    for epoch in range(cfg.student_epochs):
        total, n = 0.0, 0
        for batch in data.batches(_epoch_order(len(data), seed + 1, epoch), cfg.batch_size):
            mask = drop_modalities(batch.mask, cfg.modality_dropout, gen)
            with torch.no_grad():
                t_logits, t_emb = teacher(batch.inputs, mask)
            s_logits, s_emb = student(batch.inputs, mask)
            loss = distillation_loss(s_logits, s_emb, t_logits, t_emb, batch.labels, mask, cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(batch.labels), n + len(batch.labels)
        log(f"student epoch {epoch + 1}/{cfg.student_epochs}: loss {total / max(n, 1):.4f}")
    student.eval()
    return student


@torch.no_grad()
def positive_probability(model: torch.nn.Module, batch: Batch) -> np.ndarray:
    logits, _ = model(batch.inputs, batch.mask)
    return torch.softmax(logits, -1)[:, -1].numpy()
