"""Readers of clinical files; each returns plain arrays or refuses with a BadInput naming the file."""

from __future__ import annotations

from pathlib import Path

from ..errors import BadInput


def check_within(path: Path, root: Path | None) -> Path:
    """``path`` itself, refused when its real location (links followed) is outside ``root``.

    Readers call this on every file they open, not only on the path the manifest names: a folder
    inside the manifest's folder may hold links to anywhere. ``None`` means no bound (one file named
    on the command line).
    """
    if root is None:
        return path
    real = Path(path).resolve()
    if not real.is_relative_to(Path(root).resolve()):
        raise BadInput(f"{path}: links to {real}, outside the manifest's folder {root}")
    return path
