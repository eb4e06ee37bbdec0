"""Teacher updates read one tensor at a time (federation.tensor_stream): files the safetensors
library writes are read from a plain stream, checked against the model, and every malformed or
foreign update refused in one line."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save

from edge_runtime.errors import BadInput
from edge_runtime.finetune.head import l2_norm
from federation import tensor_stream as ts

RNG = np.random.default_rng(0)
DELTA = {"conv.weight": RNG.normal(size=(4, 3, 3, 3)).astype(np.float32), "fc.bias": RNG.normal(size=7).astype(np.float32),
         "fc.weight": RNG.normal(size=(7, 16)).astype(np.float32)}
SHAPES = {k: v.shape for k, v in DELTA.items()}


class OneByteAtATime(io.RawIOBase):
    """A stream that returns at most 3 bytes per read: nothing may assume whole reads."""

    def __init__(self, data: bytes) -> None:
        self._data, self._at = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(3, len(buffer), len(self._data) - self._at)
        buffer[:n] = self._data[self._at:self._at + n]
        self._at += n
        return n


def test_library_written_update_reads_back_tensor_by_tensor_from_a_stream():
    data = save(DELTA, metadata={"update_id": "u-1"})
    got = dict(ts.iter_tensors(OneByteAtATime(data), SHAPES))
    assert got.keys() == DELTA.keys() and all(np.array_equal(got[k], DELTA[k]) for k in DELTA)
    assert ts.stream_norm(io.BytesIO(data), SHAPES) == pytest.approx(l2_norm(DELTA), rel=1e-12)


def raw(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def good_header() -> tuple[dict, bytes]:
    data = save(DELTA)
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


@pytest.mark.parametrize("how, says", [
    ("truncated", "ends inside tensor"), ("trailing bytes", "bytes after the last tensor"),
    ("missing tensor", "missing ['fc.bias']"), ("unknown tensor", "unknown ['extra']"),
    ("wrong shape", "has shape [7, 15]"), ("float64", "is F64"), ("hole", "does not follow"),
    ("overlap", "does not follow"), ("nan", "non-finite"), ("header 2 GB", "header of 2147483648 bytes"),
    ("not json", "not JSON"), ("empty", "ends inside the header length")])
def test_malformed_or_foreign_update_is_refused_in_one_line(how, says):
    header, body = good_header()
    names = sorted(header.keys() - {"__metadata__"}, key=lambda k: header[k]["data_offsets"][0])
    if how == "truncated":
        data = raw(header, body[:-5])
    elif how == "trailing bytes":
        data = raw(header, body + b"\0")
    elif how == "missing tensor":
        del header["fc.bias"]
        data = raw(header, body)
    elif how == "unknown tensor":
        header["extra"] = {"dtype": "F32", "shape": [1], "data_offsets": [len(body), len(body) + 4]}
        data = raw(header, body + b"\0" * 4)
    elif how == "wrong shape":
        header["fc.weight"]["shape"] = [7, 15]
        data = raw(header, body)
    elif how == "float64":
        header["fc.bias"]["dtype"] = "F64"
        data = raw(header, body)
    elif how == "hole":
        for name in names[1:]:
            header[name]["data_offsets"] = [x + 4 for x in header[name]["data_offsets"]]
        first_end = header[names[0]]["data_offsets"][1]
        data = raw(header, body[:first_end] + b"\0" * 4 + body[first_end:])
    elif how == "overlap":
        header[names[1]]["data_offsets"] = [x - 4 for x in header[names[1]]["data_offsets"]]
        data = raw(header, body)
    elif how == "nan":
        bad = dict(DELTA, **{"fc.bias": np.full(7, np.nan, np.float32)})
        data = save(bad)
    elif how == "header 2 GB":
        data = struct.pack("<Q", 2**31) + b"{}"
    elif how == "not json":
        data = struct.pack("<Q", 4) + b"{{{{"
    else:
        data = b""
    with pytest.raises(BadInput, match="^hospital-a update: ") as err:
        list(ts.iter_tensors(io.BytesIO(data), SHAPES, where="hospital-a update"))
    assert says in str(err.value) and "\n" not in str(err.value)
