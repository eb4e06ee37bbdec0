"""The head's weights as ``head.npz`` in the bundle: what the clinic fine-tunes in numpy (it has no
onnx package to read them from ``head.onnx``). Names are the StudentHead state-dict names."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from edge_runtime.finetune.head import params_bytes
from edge_runtime.fsutil import write_atomic


def save_head_weights(head: nn.Module, path: Path) -> Path:
    """``head.state_dict()`` as float32 arrays in an uncompressed npz, written atomically."""
    write_atomic(Path(path), params_bytes({name: t.detach().cpu().numpy() for name, t in head.state_dict().items()}))
    return Path(path)
