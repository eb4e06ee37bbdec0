"""Accuracy-aware fallback (DESIGN §7): keep the most quantization-sensitive nodes in FP32, one at a
time, until the metric's drop against the FP32 model fits the tolerance. The loop is pure: it is
given how to quantize, how to score and how to rank, so tests can drive it on any model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

M = TypeVar("M")  # whatever quantize() returns: one model file, or one per encoder


@dataclass
class FallbackResult(Generic[M]):
    model: M
    excluded: list[str]
    score: float
    reference: float
    tolerance: float
    history: list[dict] = field(default_factory=list)  # one entry per quantization tried

    @property
    def within_tolerance(self) -> bool:
        return self.reference - self.score <= self.tolerance


def accuracy_fallback(
    quantize: Callable[[list[str]], M],
    score: Callable[[M], float],
    rank: Callable[[M], list[str]],
    reference: float,
    tolerance: float = 0.005,
    max_excluded: int = 16,
) -> FallbackResult[M]:
    """``quantize(excluded)`` writes a model, ``score(model)`` is higher-is-better (AUC), ``rank(model)``
    lists nodes most sensitive first (measured once, on the first full quantization)."""
    excluded: list[str] = []
    model = quantize(excluded)
    current = score(model)
    history = [{"excluded": [], "score": current}]
    order = list(rank(model)) if reference - current > tolerance else []
    while reference - current > tolerance and order and len(excluded) < max_excluded:
        excluded.append(order.pop(0))
        model = quantize(list(excluded))
        current = score(model)
        history.append({"excluded": list(excluded), "score": current})
    return FallbackResult(model, excluded, current, reference, tolerance, history)
