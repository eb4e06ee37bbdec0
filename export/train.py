"""Centralized teacher training and student distillation (DESIGN §3).

Teacher loss: cross-entropy + contrastive alignment of the modalities of one case
              + aux_weight * MSE of the auxiliary risk score (multi-task, where a target exists).
Student loss: (1 - alpha) * CE(label) + alpha * T^2 * KL(teacher_T || student_T)
              + feature matching (MSE) of the shared-space embeddings of present modalities.
Both use modality dropout, so every non-empty subset of modalities is seen in training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edge_runtime.errors import BadInput
from edge_runtime.metrics import roc_auc
from edge_runtime.progress import progress

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


def augment(inputs: dict[str, torch.Tensor], gen: torch.Generator, gene_noise: float = 0.1) -> dict[str, torch.Tensor]:
    """Label-preserving augmentation, per case: left/right and front/back flips of the CT volume,
    flips and 90-degree turns of the tile, small noise on the z-scored expression values."""
    out = dict(inputs)
    for name, dims in (("ct", (-1, -2)), ("pathology", (-1, -2))):
        x = out[name]
        for dim in dims:
            flip = (torch.rand(x.shape[0], generator=gen) < 0.5).view(-1, *([1] * (x.ndim - 1)))
            x = torch.where(flip, x.flip(dim), x)
        out[name] = x
    turn = (torch.rand(out["pathology"].shape[0], generator=gen) < 0.5).view(-1, 1, 1, 1)
    out["pathology"] = torch.where(turn, out["pathology"].transpose(-1, -2), out["pathology"])
    out["genomics"] = out["genomics"] + gene_noise * torch.randn(out["genomics"].shape, generator=gen)
    return out


def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, 7, epoch]).permutation(n)


@torch.no_grad()
def validation_auc(model: torch.nn.Module, val: PreparedCases, batch_size: int, device: str = "cpu") -> float:
    model.eval()
    labels, scores = [], []
    for batch in val.batches(np.arange(len(val)), batch_size):
        labels.extend(batch.labels.tolist())
        scores.extend(positive_probability(model, batch.to(device)).tolist())
    return roc_auc(np.asarray(labels), np.asarray(scores))


def fit(
    model: torch.nn.Module, loss_fn: Callable[[Batch, torch.Tensor], torch.Tensor], data: PreparedCases,
    val: PreparedCases | None, cfg: TrainConfig, epochs: int, seed: int, name: str, log: Log, device: str = "cpu",
) -> torch.nn.Module:
    """The loop both models share: AdamW with cosine decay, modality dropout, and the weights of the
    epoch with the best validation AUC kept (small cohorts overfit within a few epochs)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)  # CPU generator: the same random choices on any device
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = epochs * max(1, -(-len(data) // cfg.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    best_auc, best_state = -np.inf, None
    with progress(f"{name} training", steps) as advance:
        for epoch in range(epochs):
            model.train()
            total, n = 0.0, 0
            for batch in data.batches(_epoch_order(len(data), seed, epoch), cfg.batch_size):
                if cfg.augment:
                    batch = dataclasses.replace(batch, inputs=augment(batch.inputs, gen))
                mask = drop_modalities(batch.mask, cfg.modality_dropout, gen).to(device)
                loss = loss_fn(batch.to(device), mask)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                advance(1)
                total, n = total + loss.item() * len(batch.labels), n + len(batch.labels)
            auc = validation_auc(model, val, cfg.batch_size, device) if val is not None and len(val) else float("nan")
            log(f"{name} epoch {epoch + 1}/{epochs}: loss {total / max(n, 1):.4f}  validation AUC {auc:.4f}")
            if best_state is None or not auc <= best_auc:  # NaN (no validation, or one class) keeps the latest
                best_auc, best_state = auc, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    model.to("cpu")  # export, evaluation and the clinic are CPU
    model.load_state_dict(best_state)
    model.eval()
    return model


def train_teacher(
    teacher: Teacher, data: PreparedCases, val: PreparedCases | None, cfg: TrainConfig, seed: int, log: Log, device: str = "cpu"
) -> Teacher:
    return fit(teacher, lambda batch, mask: teacher_loss(teacher, batch, mask, cfg), data, val, cfg,
               cfg.teacher_epochs, seed, "teacher", log, device)


def teacher_loss(teacher: Teacher, batch: Batch, mask: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Cross-entropy on the kept modalities + contrastive alignment. One encoder pass: alignment sees
    every present modality, the classifier only those ``mask`` keeps (modality dropout)."""
    emb = teacher.embed(batch.inputs, batch.mask)
    fused = teacher.fuse(emb, mask)
    loss = F.cross_entropy(teacher.classifier(fused), batch.labels)
    if cfg.contrastive_weight:
        loss = loss + cfg.contrastive_weight * teacher.alignment.loss(emb, batch.mask)
    if cfg.aux_weight and batch.risk is not None:
        known = torch.isfinite(batch.risk)
        if bool(known.any()):
            risk = teacher.risk_head(fused).squeeze(-1)
            loss = loss + cfg.aux_weight * F.mse_loss(risk[known], batch.risk[known])
    return loss


def distillation_loss(
    s_logits: torch.Tensor, s_emb: torch.Tensor, t_logits: torch.Tensor, t_emb: torch.Tensor,
    labels: torch.Tensor, mask: torch.Tensor, cfg: TrainConfig,
) -> torch.Tensor:
    temp = cfg.kd_temperature
    kl = F.kl_div(F.log_softmax(s_logits / temp, -1), F.softmax(t_logits / temp, -1), reduction="batchmean") * temp**2
    ce = F.cross_entropy(s_logits, labels)
    feat = (((s_emb - t_emb) ** 2).mean(-1) * mask).sum() / mask.sum().clamp(min=1.0)
    return (1 - cfg.kd_alpha) * ce + cfg.kd_alpha * kl + cfg.feature_weight * feat


def distill(
    student: Student, teacher: Teacher, data: PreparedCases, val: PreparedCases | None, cfg: TrainConfig, seed: int,
    log: Log, device: str = "cpu",
) -> Student:
    teacher.to(device).eval()

    def loss_fn(batch: Batch, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits, t_emb = teacher(batch.inputs, mask)
        s_logits, s_emb = student(batch.inputs, mask)
        return distillation_loss(s_logits, s_emb, t_logits, t_emb, batch.labels, mask, cfg)

    student = fit(student, loss_fn, data, val, cfg, cfg.student_epochs, seed + 1, "student", log, device)
    teacher.to("cpu")
    return student


@torch.no_grad()
def positive_probability(model: torch.nn.Module, batch: Batch) -> np.ndarray:
    logits, _ = model(batch.inputs, batch.mask)
    return torch.softmax(logits, -1)[:, -1].cpu().numpy()


def load_pretrained(model: torch.nn.Module, path: Path) -> tuple[int, int]:
    """Start from a local checkpoint (never downloaded): every tensor whose name and shape match is
    loaded, the rest keeps its initialisation (transfer to another config or head). Accepts a raw
    state dict or our checkpoints ({"teacher": ...} from the pipeline, {"model": ...} from federation)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises OSError, UnpicklingError, RuntimeError, ... on bad files
        raise BadInput(f"{path}: not a readable torch checkpoint ({type(exc).__name__})") from exc
    for key in ("teacher", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BadInput(f"{path}: checkpoint holds no state dict")
    own = model.state_dict()
    matching = {k: v for k, v in state.items() if k in own and getattr(v, "shape", None) == own[k].shape}
    if not matching:
        raise BadInput(f"{path}: no tensor of the checkpoint matches this model")
    model.load_state_dict(matching, strict=False)
    return len(matching), len(own) - len(matching)

