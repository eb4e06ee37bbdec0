"""Embedding cache on disk: what the frozen encoders make of each case, computed once per case and
reused across rounds while the bundle's encoders (and preprocessing) are unchanged.

One folder per encoder key (SHA-256 over the variant's encoder files and the preprocessing), holding
``emb.f32`` (rows x modalities x dim, float32, appended), ``mask.u8`` and ``index.json`` (case id ->
row and a fingerprint of the manifest row and its files). Reads go through a read-only memory map;
pages are dropped after each use so resident memory stays flat whatever the cache's size. Its size
is bounded (``max_mb``); another encoder key's folder is deleted when a new one is opened.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import BadInput
from ..fsutil import fsync_dir, write_atomic

DEFAULT_MAX_MB = 512.0


def encoder_key(bundle_manifest: dict, variant: str, encoder_files: dict[str, str]) -> str:
    """SHA-256 over the encoders' own SHA-256 (from the verified manifest) and the preprocessing."""
    files = bundle_manifest["files"]
    body = {"variant": variant, "encoders": {m: files[f]["sha256"] for m, f in sorted(encoder_files.items())},
            "preprocessing": bundle_manifest["preprocessing"], "dim": bundle_manifest["embedding_dim"]}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def bundle_encoder_key(bundle_manifest: dict, variant: str) -> str:
    """encoder_key of one of a bundle's encoder variants."""
    return encoder_key(bundle_manifest, variant, {v["name"]: v["encoders"] for v in bundle_manifest["variants"]}[variant])


def fingerprint(fields: list[str], folder: Path) -> str:
    """Manifest row values plus size and mtime of the files they name: a changed file is re-encoded."""
    parts = []
    for value in fields:
        for item in (p.strip() for p in value.split(";")):
            if not item:
                continue
            path = folder / item
            try:
                st = path.stat()
                parts.append(f"{item}:{st.st_size}:{st.st_mtime_ns}")
            except OSError:
                parts.append(f"{item}:?")
        parts.append("|")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


class EmbeddingCache:
    def __init__(self, root: Path, key: str, dim: int, n_modalities: int = 3, max_mb: float = DEFAULT_MAX_MB) -> None:
        self.root, self.key, self.dim, self.n_mod = Path(root), key, int(dim), n_modalities
        self.folder = self.root / key[:24]
        self.row_bytes = n_modalities * self.dim * 4
        self.capacity = int(max_mb * 1e6 // (self.row_bytes + n_modalities))
        if self.capacity < 1:
            raise BadInput(f"cache size {max_mb:g} MB holds no case")
        self._drop_other_keys()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.emb_path, self.mask_path, self.index_path = self.folder / "emb.f32", self.folder / "mask.u8", self.folder / "index.json"
        self.cases: dict[str, list] = {}
        self.rows = 0
        self._load_index()
        self._map: mmap.mmap | None = None

    def _drop_other_keys(self) -> None:
        if self.root.is_dir():
            for other in self.root.iterdir():
                if other.is_dir() and other.name != self.key[:24]:
                    shutil.rmtree(other, ignore_errors=True)

    def _load_index(self) -> None:
        if not self.index_path.exists():
            self._truncate(0)
            return
        try:
            index = json.loads(self.index_path.read_text())
            if index["key"] != self.key or index["dim"] != self.dim:
                raise ValueError("key or dimension differs")
            rows, cases = int(index["rows"]), dict(index["cases"])
        except (OSError, ValueError, KeyError, TypeError):
            rows, cases = 0, {}  # a cache is derived data: rebuild it rather than trust a broken one
        self.rows, self.cases = rows, cases
        have = self.emb_path.stat().st_size if self.emb_path.exists() else 0
        if have < rows * self.row_bytes:
            self.rows, self.cases = 0, {}
        self._truncate(self.rows)  # rows appended after the last index write are dropped

    def _truncate(self, rows: int) -> None:
        for path, size in ((self.emb_path, rows * self.row_bytes), (self.mask_path, rows * self.n_mod)):
            with open(path, "ab") as fh:
                fh.truncate(size)

    def __len__(self) -> int:
        return len(self.cases)

    def lookup(self, case_id: str, fp: str) -> int | None:
        hit = self.cases.get(case_id)
        return int(hit[0]) if hit and hit[1] == fp else None

    def add(self, case_id: str, fp: str, emb: np.ndarray, mask: np.ndarray) -> int:
        if self.rows >= self.capacity:
            raise BadInput(f"{self.folder}: embedding cache is full ({self.capacity} cases); raise --cache-mb")
        emb = np.ascontiguousarray(emb, dtype=np.float32).reshape(self.n_mod, self.dim)
        with open(self.emb_path, "ab") as fh:
            fh.write(emb.tobytes())
        with open(self.mask_path, "ab") as fh:
            fh.write(np.asarray(mask, dtype=np.uint8).reshape(self.n_mod).tobytes())
        self.cases[case_id] = [self.rows, fp]
        self.rows += 1
        self._close_map()
        return self.rows - 1

    def flush(self) -> None:
        """Data first (fsynced), then the index that points into it."""
        for path in (self.emb_path, self.mask_path):
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
        index = {"key": self.key, "dim": self.dim, "rows": self.rows, "cases": self.cases}
        write_atomic(self.index_path, json.dumps(index, separators=(",", ":")).encode())
        fsync_dir(self.folder)

    # ------------------------------------------------------------ reading

    def _open_map(self) -> mmap.mmap:
        if self._map is None:
            with open(self.emb_path, "rb") as fh:
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def _close_map(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings (len(rows), M, d) and masks (len(rows), M) as fresh arrays; the map's pages are
        released afterwards, so only what was asked for stays resident."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return np.zeros((0, self.n_mod, self.dim), np.float32), np.zeros((0, self.n_mod), np.float32)
        mm = self._open_map()
        view = np.frombuffer(mm, dtype=np.float32).reshape(self.rows, self.n_mod, self.dim)
        emb = view[rows].copy()
        del view
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)
        return emb, self.read_masks(rows)

    def read_masks(self, rows: np.ndarray) -> np.ndarray:
        """Modality masks (len(rows), M) as float32, read through a memory map: one byte per modality."""
        if not self.rows:
            return np.zeros((0, self.n_mod), np.float32)
        masks = np.memmap(self.mask_path, dtype=np.uint8, mode="r", shape=(self.rows, self.n_mod))
        out = masks[np.asarray(rows, dtype=np.int64)].astype(np.float32)
        del masks
        return out

    def close(self) -> None:
        self._close_map()
