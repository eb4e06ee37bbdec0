"""Content-addressed blob store: BLOBS/ab/cdef... named by SHA-256, written to a temporary name,
fsynced and renamed, so a blob is either whole or absent; writing one twice is a no-op. The
temporary files of a process killed mid-write are removed when the store is next opened."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from edge_runtime.fsutil import fsync_dir, sha256_file, sweep_temps, temp_path, write_atomic


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        sweep_temps(self.root)  # temporary files of a server process on this host that was killed

    def path(self, sha: str) -> Path:
        if len(sha) != 64 or not all(c in "0123456789abcdef" for c in sha):
            raise ValueError(f"not a SHA-256: {sha!r}")
        return self.root / sha[:2] / sha[2:]

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        dest = self.path(sha)
        if dest.exists():
            return sha
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(dest, data, mode=0o600)  # temporary name, fsync, rename, fsync the folder
        return sha

    def temp(self, name: str = "upload") -> Path:
        """A temporary file name inside the store (same filesystem: put_file renames it into place);
        swept when the store is next opened if its process died."""
        return temp_path(self.root / name)

    def put_file(self, path: Path) -> tuple[str, int]:
        """Move a finished file (fsynced by its writer) into the store: (sha256, size), read once to
        hash it. The file is gone afterwards either way."""
        path = Path(path)
        sha, size = sha256_file(path), path.stat().st_size
        dest = self.path(sha)
        if dest.exists():
            path.unlink()
            return sha, size
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o600)
        os.replace(path, dest)
        fsync_dir(dest.parent)
        return sha, size

    def get(self, sha: str) -> bytes:
        data = self.path(sha).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise OSError(f"blob {sha[:16]}… is corrupt")
        return data

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()
