"""A CalibrationDataReader that streams one case at a time: memory does not grow with the set."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from onnxruntime.quantization import CalibrationDataReader


class StreamingReader(CalibrationDataReader):
    """Feeds ``{input_name: array}`` dicts from a fresh iterator; ``rewind`` starts it again."""

    def __init__(self, make_iter: Callable[[], Iterator[dict[str, np.ndarray]]]) -> None:
        self._make_iter = make_iter
        self._it = make_iter()
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self._it, None)
        if item is not None:
            self.count += 1
        return item

    def rewind(self) -> None:
        self._it = self._make_iter()
