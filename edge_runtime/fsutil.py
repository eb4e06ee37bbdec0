"""Crash-safe file writes: temporary name, fsync, rename (DESIGN §6)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` so that ``path`` holds either its old or its new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")  # unique: threads may race
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written and fsynced directory into place, replacing an older one."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_text(path: Path, what: str, max_bytes: int) -> str:
    """A small UTF-8 text file (BOM tolerated) that outside input gave us, or a BadInput naming it."""
    from .errors import BadInput

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: {what} does not exist")
    if path.stat().st_size > max_bytes:
        raise BadInput(f"{path}: {what} is larger than {max_bytes // 2**20} MiB")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadInput(f"{path}: {what} is not UTF-8 text") from exc
    if "\x00" in text:
        raise BadInput(f"{path}: {what} is binary, not text")
    return text

