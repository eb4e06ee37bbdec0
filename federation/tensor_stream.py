"""A large update's tensors, read one at a time from a stream (the hospital tier's teacher updates,
DESIGN §10): the server checks, measures and aggregates a ~160 MB update without holding it whole.

The format is safetensors (written by the ``safetensors`` library on the hospital: an 8-byte
little-endian header length, a JSON header naming each tensor's dtype, shape and byte range, then
the bytes). The library reads files by random access (mmap); the server reads a *stream* (the
decrypting stream of ``federation.sealed_stream``), so this module parses the same format
sequentially, by hand: about forty lines, checked against files the library writes.

Checked before any tensor is used: header size, JSON, every name and shape against the federation's
model (``expected``), float32 only, byte ranges contiguous from 0 without holes or overlaps in name
order of their offsets, the stream ending exactly where the last tensor does, every value finite.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from typing import BinaryIO

import numpy as np

from edge_runtime.errors import BadInput

MAX_HEADER = 16 << 20  # a header of 16 MB names ~100 k tensors; beyond it is not an update
DTYPES = {"F32": np.dtype("<f4")}  # updates are float32 deltas
READ = 1 << 20
HEADER_PER_TENSOR = 160  # '"NAME":{"dtype":"F32","shape":[...],"data_offsets":[A,B]},' beyond the name


def _read_exact(stream: BinaryIO, n: int, where: str, what: str) -> bytes:
    buf = bytearray(n)
    _fill(stream, memoryview(buf), where, what)
    return bytes(buf)


def _fill(stream: BinaryIO, view: memoryview, where: str, what: str, done: int = 0, total: int | None = None) -> None:
    """Fill ``view`` from the stream, READ bytes at a time, without an intermediate copy."""
    total = len(view) if total is None else total
    got = 0
    while got < len(view):
        n = stream.readinto(view[got:got + READ]) if hasattr(stream, "readinto") else _read_to(stream, view[got:got + READ])
        if not n:
            raise BadInput(f"{where}: update ends inside {what} ({done + got} of {total} bytes)")
        got += n


def _read_to(stream: BinaryIO, view: memoryview) -> int:
    data = stream.read(len(view))
    view[:len(data)] = data
    return len(data)


def read_header(stream: BinaryIO, expected: Mapping[str, tuple[int, ...]] | None, where: str) -> list[tuple[str, tuple[int, ...], int]]:
    """The tensors in stream order as (name, shape, byte length), checked against ``expected``
    (None: any names and shapes, e.g. the first global teacher, which defines the federation's)."""
    (size,) = struct.unpack("<Q", _read_exact(stream, 8, where, "the header length"))
    if not 2 <= size <= MAX_HEADER:
        raise BadInput(f"{where}: header of {size} bytes (allowed 2 .. {MAX_HEADER})")
    try:
        header = json.loads(_read_exact(stream, size, where, "the header"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"{where}: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise BadInput(f"{where}: header is not a JSON object")
    header.pop("__metadata__", None)
    missing, extra = (sorted(set(expected) - set(header)), sorted(set(header) - set(expected))) if expected is not None else ([], [])
    if missing or extra:
        raise BadInput(f"{where}: tensors differ from the model's (missing {missing[:3]}, unknown {extra[:3]})")
    entries = []
    for name, spec in header.items():
        try:
            dtype, shape, (start, end) = spec["dtype"], tuple(int(x) for x in spec["shape"]), spec["data_offsets"]
        except (TypeError, KeyError, ValueError) as exc:
            raise BadInput(f"{where}: tensor {name!r}: malformed entry ({exc})") from None
        if dtype not in DTYPES:
            raise BadInput(f"{where}: tensor {name!r} is {dtype}; updates are {', '.join(DTYPES)}")
        if expected is not None and shape != tuple(expected[name]):
            raise BadInput(f"{where}: tensor {name!r} has shape {list(shape)}, the model's is {list(expected[name])}")
        entries.append((int(start), int(end), name, shape))
    entries.sort()
    offset = 0
    for start, end, name, shape in entries:
        if start != offset or end - start != int(np.prod(shape, dtype=np.int64)) * DTYPES["F32"].itemsize:
            raise BadInput(f"{where}: tensor {name!r}: byte range [{start}, {end}) does not follow at {offset} with its shape's size")
        offset = end
    return [(name, shape, end - start) for start, end, name, shape in entries]


def shapes(path, where: str | None = None) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a float32 safetensors file, from its header alone."""
    with open(path, "rb") as fh:
        return {name: shape for name, shape, _ in read_header(fh, None, where or str(path))}


def plain_size_bounds(expected: Mapping[str, tuple[int, ...]]) -> tuple[int, int]:
    """The least and most bytes a safetensors file of exactly these tensors takes: the tensor bytes,
    the 8-byte length and a JSON header (at most HEADER_PER_TENSOR bytes per entry, 8-byte padded)."""
    data = sum(int(np.prod(s, dtype=np.int64)) * 4 for s in expected.values())
    names = sum(len(n.encode()) for n in expected)
    return data + 8 + 2 + names, data + 8 + names + HEADER_PER_TENSOR * len(expected) + 1024


def iter_tensors(stream: BinaryIO, expected: Mapping[str, tuple[int, ...]] | None, where: str = "update") -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) one tensor at a time, in stream order; the stream must end after the
    last one. Memory: the largest tensor, never the update."""
    for name, shape, length in read_header(stream, expected, where):
        array = np.empty(shape, dtype=DTYPES["F32"])
        _fill(stream, memoryview(array.reshape(-1)).cast("B"), where, f"tensor {name!r}")
        if not np.all(np.isfinite(array)):
            raise BadInput(f"{where}: tensor {name!r} has non-finite values")
        yield name, array
    if stream.read(1):
        raise BadInput(f"{where}: bytes after the last tensor")


def write_tensors(sink: BinaryIO, params: Mapping[str, np.ndarray]) -> int:
    """Write float32 ``params`` as safetensors (names sorted, as the library does), one tensor at a
    time; the bytes written. The server writes each new global teacher so: it needs no second copy."""
    offsets, offset = {}, 0
    for name in sorted(params):
        size = int(params[name].size) * 4
        offsets[name] = {"dtype": "F32", "shape": list(params[name].shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(offsets, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the library pads the header to 8 bytes
    sink.write(struct.pack("<Q", len(header)) + header)
    for name in sorted(params):
        sink.write(np.ascontiguousarray(params[name], dtype=DTYPES["F32"]).tobytes())
    return 8 + len(header) + offset


def stream_norm(stream: BinaryIO, expected: Mapping[str, tuple[int, ...]], where: str = "update") -> float:
    """The update's L2 norm (float64 sums of squares per tensor, as ``l2_norm``), every check of
    iter_tensors made on the way, READ bytes at a time: memory is one block, not one tensor (the
    server measures several arriving updates at once)."""
    block = np.empty(READ // 4, dtype=DTYPES["F32"])
    total = 0.0
    for name, _shape, length in read_header(stream, expected, where):
        squares, done = 0.0, 0
        while done < length:
            part = block[: min(READ, length - done) // 4]
            _fill(stream, memoryview(part).cast("B"), where, f"tensor {name!r}", done, length)
            if not np.all(np.isfinite(part)):
                raise BadInput(f"{where}: tensor {name!r} has non-finite values")
            wide = part.astype(np.float64)
            squares += float(np.dot(wide, wide))
            done += part.nbytes
        total += squares
    if stream.read(1):
        raise BadInput(f"{where}: bytes after the last tensor")
    return float(np.sqrt(total))
