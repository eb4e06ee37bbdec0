"""The head's weights as ``head.npz`` in the bundle: what the clinic fine-tunes in numpy (it has no
onnx package to read them from ``head.onnx``). Names are the StudentHead state-dict names."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from torch import nn

from edge_runtime.fsutil import write_atomic


def save_head_weights(head: nn.Module, path: Path) -> Path:
    """``head.state_dict()`` as float32 arrays in an uncompressed npz, written atomically."""
    arrays = {name: t.detach().cpu().numpy().astype(np.float32) for name, t in head.state_dict().items()}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(Path(path), buf.getvalue())
    return Path(path)
