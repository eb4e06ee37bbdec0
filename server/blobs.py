"""Content-addressed blob store: BLOBS/ab/cdef... named by SHA-256, written to a temporary name,
fsynced and renamed, so a blob is either whole or absent; writing one twice is a no-op. The
temporary files of a process killed mid-write are removed when the store is next opened."""

from __future__ import annotations

import hashlib
from pathlib import Path

from edge_runtime.fsutil import sweep_temps, write_atomic


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

    def get(self, sha: str) -> bytes:
        data = self.path(sha).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise OSError(f"blob {sha[:16]}… is corrupt")
        return data

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()
