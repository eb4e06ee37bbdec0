"""Large updates sealed as a stream (federation.sealed_stream): round trip without holding the
update whole, and every way a stream can be altered refused with SealError."""

from __future__ import annotations

import io

import numpy as np
import pytest

from edge_runtime.errors import BadInput
from edge_runtime.sync import hpke
from federation import sealed_stream as ss

PRIVATE = hpke.HpkePrivate.generate()
INFO = hpke.update_info("hospital-a", 3, 2, "u-1", "x25519")
SIZE = 3 * ss.SEGMENT + 12_345  # four segments, the last one short


def plain() -> bytes:
    return np.random.default_rng(0).integers(0, 256, SIZE, dtype=np.uint8).tobytes()


def sealed(data: bytes, info: bytes = INFO) -> tuple[bytes, ss.StreamKey]:
    sink = io.BytesIO()
    key = ss.seal_stream(io.BytesIO(data), sink, public=PRIVATE.public(), info=info, kem="x25519")
    assert not sink.closed, "the caller's sink stays open"
    return sink.getvalue(), key


def read_all(cipher: bytes, key: ss.StreamKey, info: bytes = INFO) -> bytes:
    with ss.open_stream(io.BytesIO(cipher), key=key, private=PRIVATE, info=info) as stream:
        return stream.read()


def test_round_trip_through_files_with_the_hybrid_kem(tmp_path):
    data = plain()
    info = hpke.update_info("hospital-a", 3, 2, "u-1", hpke.DEFAULT_KEM)
    (tmp_path / "plain").write_bytes(data)
    with open(tmp_path / "plain", "rb") as src, open(tmp_path / "sealed", "wb") as sink:
        key = ss.seal_stream(src, sink, public=PRIVATE.public(), info=info)
    cipher = (tmp_path / "sealed").read_bytes()
    assert data[:4096] not in cipher
    assert len(cipher) - len(data) < 200, "overhead: a header and a 16-byte tag per 1 MB segment"
    key = ss.StreamKey.from_dict(key.to_dict())  # as it travels, in JSON
    with open(tmp_path / "sealed", "rb") as src, ss.open_stream(src, key=key, private=PRIVATE, info=info) as stream:
        parts = iter(lambda: stream.read(65_536), b"")
        assert b"".join(parts) == data


def test_two_seals_of_the_same_update_differ():
    data = plain()[:1000]
    assert sealed(data)[0] != sealed(data)[0], "a fresh keyset (and salt) per update"


def flip(cipher: bytes, at: int) -> bytes:
    return cipher[:at] + bytes([cipher[at] ^ 1]) + cipher[at + 1:]


@pytest.mark.parametrize("how", ["flipped byte", "truncated at a segment boundary", "truncated mid-segment",
                                 "segments swapped", "tail cut off", "another update's info", "another stream's key"])
def test_altered_stream_does_not_open(how):
    data = plain()
    cipher, key = sealed(data)
    seg = ss.SEGMENT  # ciphertext segment length (the first one holds the stream header too)
    boundaries = list(range(seg, len(cipher), seg))
    info, other_key = INFO, key
    if how == "flipped byte":
        cipher = flip(cipher, len(cipher) // 2)
    elif how == "truncated at a segment boundary":
        cipher = cipher[: boundaries[1]]
    elif how == "truncated mid-segment":
        cipher = cipher[: boundaries[1] + 1000]
    elif how == "segments swapped":
        a, b = boundaries[0], boundaries[1]
        cipher = cipher[:a] + cipher[b: b + seg] + cipher[a:b] + cipher[b + seg:]
    elif how == "tail cut off":
        cipher = cipher[:-1]
    elif how == "another update's info":
        info = hpke.update_info("hospital-a", 3, 2, "u-2", "x25519")
    else:
        other_key = sealed(data)[1]
    with pytest.raises(hpke.SealError, match="does not open"):
        assert read_all(cipher, other_key, info) != data


def test_stream_key_that_is_not_json_of_the_format_is_refused_in_one_line():
    with pytest.raises(BadInput, match="stream key is malformed"):
        ss.StreamKey.from_dict({"kem": "x25519", "sealed_keyset": "not base64!"})


def test_sealing_and_opening_64_mb_holds_one_segment_not_the_update(tmp_path):
    """In a fresh process (peak RSS is per process): 64 MB sealed to a file and opened into a hash,
    the peak grows by a few segments, far below the update's size."""
    import subprocess
    import sys

    code = f"""
import hashlib, io, resource
from pathlib import Path
from edge_runtime.sync import hpke
from federation import sealed_stream as ss

class Source(io.RawIOBase):  # 64 MB made on the fly: the update is never in memory
    def __init__(self): self.left = 64 << 20
    def readable(self): return True
    def readinto(self, b):
        n = min(len(b), self.left); b[:n] = bytes([self.left % 251]) * n; self.left -= n; return n

private = hpke.HpkePrivate.generate()
info = hpke.update_info("h", 1, 1, "u", "x25519")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
path = Path({str(tmp_path)!r}) / "sealed"
want = hashlib.sha256()
src = Source()
with open(path, "wb") as sink:
    key = ss.seal_stream(io.BufferedReader(src, 1 << 20), sink, public=private.public(), info=info, kem="x25519")
got = hashlib.sha256()
with open(path, "rb") as f, ss.open_stream(f, key=key, private=private, info=info) as s:
    while chunk := s.read(1 << 20): got.update(chunk)
src2 = Source()
while chunk := src2.read(1 << 20): want.update(chunk)
assert got.digest() == want.digest()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "sealed").stat().st_size > 64 << 20
    grown = int(out.stdout.strip())
    assert grown < 24, f"peak RSS grew by {grown} MB for a 64 MB update"
