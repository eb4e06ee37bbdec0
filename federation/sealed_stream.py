"""Large updates sealed as a stream: the hospital tier's teacher updates (DESIGN §10; ~160 MB for the
`full` teacher), encrypted and decrypted without ever holding the update whole in memory.

Construction: Tink's streaming AEAD, key template AES256_GCM_HKDF_1MB. That is the STREAM
construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015): a per-stream AES-256 key derived by
HKDF-SHA256 from the keyset's key and a random salt in the stream header, then each 1 MB segment
sealed with AES-256-GCM under a nonce made of a random prefix, the segment counter and a
last-segment flag. A truncated, reordered, spliced or tampered stream fails to decrypt at the
segment where it differs. Why Tink rather than our own chunked GCM: it is a kept, reviewed
implementation of exactly this nonce layout and last-segment binding, which is where hand-written
chunked AEAD goes wrong.

A fresh keyset per update. The keyset is HPKE-sealed to the server with the suite and the ``info``
binding that head updates use (sender, round, base version, update id, KEM: ``hpke.update_info``),
and the same ``info`` is the stream's associated data: a stream moved to another sender, round or
update id does not open. The keyset exists unencrypted only in memory, on each side.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import tink
from tink import secret_key_access, streaming_aead

from edge_runtime.errors import BadInput
from edge_runtime.sync import hpke

streaming_aead.register()

TEMPLATE = streaming_aead.streaming_aead_key_templates.AES256_GCM_HKDF_1MB
SEGMENT = 1 << 20  # the template's ciphertext segment size
COPY = 1 << 20  # bytes moved per read/write while sealing or opening
HEADER, TAG = 40, 16  # stream header (length byte, 32-byte salt, 7-byte nonce prefix); GCM tag per segment


def sealed_size(plain_size: int) -> int:
    """The ciphertext size of a ``plain_size``-byte stream (the first segment also holds the header):
    what a declared upload size is checked against before any byte of it is stored."""
    first = SEGMENT - HEADER - TAG
    segments = 1 if plain_size <= first else 1 + -(-(plain_size - first) // (SEGMENT - TAG))
    return plain_size + HEADER + TAG * segments


@dataclass(frozen=True)
class StreamKey:
    """What travels beside the ciphertext stream: the HPKE-sealed Tink keyset and the KEM it used."""

    kem: str
    sealed_keyset: bytes

    def to_dict(self) -> dict:
        return {"kem": self.kem, "sealed_keyset": base64.b64encode(self.sealed_keyset).decode()}

    @classmethod
    def from_dict(cls, doc: dict) -> "StreamKey":
        try:
            return cls(str(doc["kem"]), base64.b64decode(doc["sealed_keyset"], validate=True))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"stream key is malformed ({exc})") from None


class _Unclosing(io.RawIOBase):
    """Tink closes the destination it writes to; the caller owns ``sink`` and closes it itself."""

    def __init__(self, sink: BinaryIO) -> None:
        self._sink = sink

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self._sink.write(data)

    def close(self) -> None:
        self._sink.flush()
        super().close()


def seal_stream(source: BinaryIO, sink: BinaryIO, *, public: hpke.HpkePublic, info: bytes,
                kem: str = hpke.DEFAULT_KEM) -> StreamKey:
    """Encrypt ``source`` to ``sink`` as it is read (memory: one segment); returns the sealed key."""
    handle = tink.new_keyset_handle(TEMPLATE)
    keyset = tink.proto_keyset_format.serialize(handle, secret_key_access.TOKEN)
    key = StreamKey(kem, hpke.seal(keyset, public, info, kem))
    with handle.primitive(streaming_aead.StreamingAead).new_encrypting_stream(_Unclosing(sink), info) as out:
        while chunk := source.read(COPY):
            out.write(chunk)
    return key


class _Opened(io.RawIOBase):
    """The decrypted stream; a segment that does not authenticate raises SealError naming ``where``."""

    def __init__(self, stream, where: str) -> None:
        self._stream, self._where = stream, where

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self._stream.read(len(buffer))
        except tink.TinkError as exc:
            raise hpke.SealError(f"{self._where}: sealed stream does not open: tampered, truncated, reordered, "
                                 f"or bound to another sender, round or update ({str(exc)[:60]})") from None
        n = len(data)
        buffer[:n] = data
        return n


@contextmanager
def open_stream(source: BinaryIO, *, key: StreamKey, private: hpke.HpkePrivate, info: bytes,
                where: str = "stream") -> Iterator[io.BufferedReader]:
    """The plaintext of a sealed stream, read as it is decrypted (memory: one segment). The keyset
    opens only with this ``info``; every segment is authenticated before its bytes are returned, and
    the end of the stream only where the sender ended it."""
    keyset = hpke.open_sealed(key.sealed_keyset, private, info, key.kem)
    try:
        handle = tink.proto_keyset_format.parse(keyset, secret_key_access.TOKEN)
        primitive = handle.primitive(streaming_aead.StreamingAead)
    except tink.TinkError as exc:
        raise hpke.SealError(f"{where}: stream keyset is not a streaming AEAD keyset ({str(exc)[:60]})") from None
    with primitive.new_decrypting_stream(source, info) as stream:
        yield io.BufferedReader(_Opened(stream, where), COPY)
