"""HPKE (RFC 9180) sealing of updates to the server, with cryptography's own HPKE (DESIGN §8).

Suite: KEM MLKEM768-X25519 (hybrid post-quantum, default) or X25519, KDF HKDF-SHA256, AEAD
AES-256-GCM. The server holds one key pair with both parts (an ML-KEM-768 seed and an X25519 key),
so a clinic may seal with either KEM. The ``info`` string binds clinic, round, base version and
update id: a ciphertext moved to another clinic, round or update id does not open.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)

from ..bundle import canonical_json
from ..errors import BadInput
from ..fsutil import write_atomic

KEMS = {"mlkem768-x25519": hpke.KEM.MLKEM768_X25519, "x25519": hpke.KEM.X25519}
DEFAULT_KEM = "mlkem768-x25519"
INFO_PREFIX = b"dwfl-update-v1\n"


class SealError(BadInput):
    """A ciphertext that does not open (tampered, or bound to other clinic / round / update)."""


def suite(kem: str) -> hpke.Suite:
    if kem not in KEMS:
        raise BadInput(f"unknown KEM {kem!r}: choose one of {', '.join(KEMS)}")
    return hpke.Suite(KEMS[kem], hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def update_info(clinic: str, round_id: int, base_version: int, update_id: str, kem: str) -> bytes:
    return INFO_PREFIX + canonical_json(
        {"clinic": clinic, "round": int(round_id), "base_version": int(base_version), "update_id": update_id, "kem": kem})


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s, validate=True)


@dataclass(frozen=True)
class HpkePublic:
    mlkem: bytes  # ML-KEM-768 encapsulation key (1184 bytes)
    x25519: bytes  # raw X25519 public key (32 bytes)

    def to_dict(self) -> dict:
        return {"mlkem768": _b64(self.mlkem), "x25519": _b64(self.x25519)}

    @classmethod
    def from_dict(cls, doc: dict) -> "HpkePublic":
        try:
            pub = cls(_unb64(doc["mlkem768"]), _unb64(doc["x25519"]))
            pub.key("mlkem768-x25519")
            return pub
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"server HPKE public key is malformed ({exc})") from exc

    def key(self, kem: str):
        x = X25519PublicKey.from_public_bytes(self.x25519)
        if kem == "x25519":
            return x
        return hpke.MLKEM768X25519PublicKey(mlkem.MLKEM768PublicKey.from_public_bytes(self.mlkem), x)

    def canonical(self) -> bytes:
        return canonical_json(self.to_dict())


@dataclass(frozen=True)
class HpkePrivate:
    seed: bytes  # ML-KEM-768 seed (64 bytes)
    x25519: bytes  # raw X25519 private key

    @classmethod
    def generate(cls) -> "HpkePrivate":
        return cls(mlkem.MLKEM768PrivateKey.generate().private_bytes_raw(), X25519PrivateKey.generate().private_bytes_raw())

    def key(self, kem: str):
        x = X25519PrivateKey.from_private_bytes(self.x25519)
        if kem == "x25519":
            return x
        return hpke.MLKEM768X25519PrivateKey(mlkem.MLKEM768PrivateKey.from_seed_bytes(self.seed), x)

    def public(self) -> HpkePublic:
        m = mlkem.MLKEM768PrivateKey.from_seed_bytes(self.seed).public_key().public_bytes_raw()
        return HpkePublic(m, X25519PrivateKey.from_private_bytes(self.x25519).public_key().public_bytes_raw())

    def save(self, path: Path) -> None:
        doc = {"kind": "dwfl-hpke-private-v1", "mlkem768_seed": _b64(self.seed), "x25519": _b64(self.x25519)}
        write_atomic(Path(path), json.dumps(doc).encode(), mode=0o600)

    @classmethod
    def load(cls, path: Path) -> "HpkePrivate":
        try:
            doc = json.loads(Path(path).read_text())
            return cls(_unb64(doc["mlkem768_seed"]), _unb64(doc["x25519"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BadInput(f"{path}: cannot read the HPKE private key ({exc})") from exc


def seal(plaintext: bytes, public: HpkePublic, info: bytes, kem: str = DEFAULT_KEM) -> bytes:
    return suite(kem).encrypt(plaintext, public.key(kem), info=info)


def open_sealed(ciphertext: bytes, private: HpkePrivate, info: bytes, kem: str) -> bytes:
    try:
        return suite(kem).decrypt(ciphertext, private.key(kem), info=info)
    except (InvalidTag, ValueError) as exc:
        raise SealError("sealed update does not open: ciphertext tampered with, or bound to another clinic, round or update id") from exc
