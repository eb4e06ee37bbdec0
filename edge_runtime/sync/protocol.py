"""Wire formats shared by the clinic and the server (DESIGN §8); no web framework needed.

Signed requests: Ed25519 over ::

    dwfl-request-v1 \\n METHOD \\n PATH \\n TIMESTAMP \\n NONCE \\n SHA256(BODY)

sent in the headers X-DWFL-Clinic, X-DWFL-Timestamp (Unix seconds), X-DWFL-Nonce (random, 16-64
URL-safe characters) and X-DWFL-Signature (base64). The server refuses stale timestamps (more than
MAX_SKEW_S away from its clock), a nonce it has seen from that clinic, unknown or revoked clinics.

Updates travel as an :class:`Envelope` (JSON): who, which round and base version, the update id
(idempotency key), the KEM, the HPKE ciphertext of the outbox ``.npz`` (delta + meta.json), and the
clinic's Ed25519 signature over the binding info and the ciphertext.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ..errors import BadInput
from .hpke import KEMS, update_info

MAX_SKEW_S = 300
H_CLINIC, H_TS, H_NONCE, H_SIG = "X-DWFL-Clinic", "X-DWFL-Timestamp", "X-DWFL-Nonce", "X-DWFL-Signature"
NONCE_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TOKEN_PREFIX = "dwfl1"


class AuthError(BadInput):
    """A request the server refuses to attribute to a clinic (HTTP 401, or 403 when revoked)."""

    def __init__(self, reason: str, status: int = 401) -> None:
        super().__init__(reason)
        self.status = status


def canonical_request(method: str, path: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    return "\n".join(["dwfl-request-v1", method.upper(), path, timestamp, nonce, hashlib.sha256(body).hexdigest()]).encode()


def sign_request(key: Ed25519PrivateKey, clinic: str, method: str, path: str, body: bytes = b"",
                 now: float | None = None, nonce: str | None = None) -> dict[str, str]:
    ts = str(int(now if now is not None else time.time()))
    nonce = nonce or secrets.token_urlsafe(24)
    sig = key.sign(canonical_request(method, path, ts, nonce, body))
    return {H_CLINIC: clinic, H_TS: ts, H_NONCE: nonce, H_SIG: base64.b64encode(sig).decode()}


def check_request_headers(headers, now: float | None = None, max_skew: int = MAX_SKEW_S) -> tuple[str, str, int, bytes]:
    """What needs neither the body nor the clinic's key (a server checks it before reading a body):
    the four headers present and well-formed, the timestamp fresh. Returns (clinic, nonce,
    timestamp, raw signature)."""
    clinic, ts, nonce, sig = (headers.get(h) for h in (H_CLINIC, H_TS, H_NONCE, H_SIG))
    if not (clinic and ts and nonce and sig):
        raise AuthError("request is not signed (X-DWFL-Clinic, -Timestamp, -Nonce and -Signature headers needed)")
    if not NAME_RE.match(clinic):
        raise AuthError("clinic name in X-DWFL-Clinic is malformed")
    if not NONCE_RE.match(nonce):
        raise AuthError("nonce must be 16-64 URL-safe characters")
    try:
        stamp = int(ts)
    except ValueError:
        raise AuthError("timestamp is not an integer") from None
    now = time.time() if now is None else now
    if abs(now - stamp) > max_skew:
        raise AuthError(f"stale timestamp: {int(now - stamp)} s off the server clock (at most {max_skew} s)")
    try:
        raw = base64.b64decode(sig, validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 64:
        raise AuthError("bad request signature (not 64 bytes of base64)")
    return clinic, nonce, stamp, raw


def check_request(headers, method: str, path: str, body: bytes, public_key: Ed25519PublicKey,
                  now: float | None = None, max_skew: int = MAX_SKEW_S) -> tuple[str, str, int]:
    """Verify the signature and freshness; returns (clinic, nonce, timestamp). The caller checks the
    nonce has not been seen and that the clinic is enrolled and not revoked."""
    clinic, nonce, stamp, sig = check_request_headers(headers, now, max_skew)
    try:
        public_key.verify(sig, canonical_request(method, path, headers.get(H_TS), nonce, body))
    except InvalidSignature:
        raise AuthError("bad request signature") from None
    return clinic, nonce, stamp


# ------------------------------------------------------------------ enrollment tokens


TIER_PREFIX = {"clinic": TOKEN_PREFIX, "hospital": TOKEN_PREFIX + "-hospital"}  # the token names its tier


def make_token(clinic: str, secret: str, server_key_id: str, tier: str = "clinic") -> str:
    return f"{TIER_PREFIX[tier]}.{clinic}.{secret}.{server_key_id}"


def parse_token(token: str) -> tuple[str, str, str, str]:
    """(clinic, secret, server key fingerprint, tier)."""
    parts = token.strip().split(".")
    tiers = {prefix: tier for tier, prefix in TIER_PREFIX.items()}
    if len(parts) < 4 or parts[0] not in tiers:
        raise BadInput("enrollment token is malformed (expected dwfl1.CLINIC.SECRET.FINGERPRINT)")
    fpr, secret, clinic = parts[-1], parts[-2], ".".join(parts[1:-2])
    if not NAME_RE.match(clinic) or not re.fullmatch(r"[0-9a-f]{64}", fpr) or not re.fullmatch(r"[A-Za-z0-9_-]{20,}", secret):
        raise BadInput("enrollment token is malformed")
    return clinic, secret, fpr, tiers[parts[0]]


def token_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# ------------------------------------------------------------------ update envelope


@dataclass(frozen=True)
class Envelope:
    update_id: str
    clinic: str
    round: int
    base_version: int
    kem: str
    sealed: str  # base64 HPKE ciphertext
    signature: str  # base64 Ed25519 over signed_bytes()

    def info(self) -> bytes:
        return update_info(self.clinic, self.round, self.base_version, self.update_id, self.kem)

    def sealed_bytes(self) -> bytes:
        return base64.b64decode(self.sealed, validate=True)

    def signed_bytes(self) -> bytes:
        return self.info() + b"\n" + hashlib.sha256(self.sealed_bytes()).digest()

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def build(cls, key: Ed25519PrivateKey, update_id: str, clinic: str, round_id: int, base_version: int, kem: str,
              sealed: bytes) -> "Envelope":
        env = cls(update_id, clinic, int(round_id), int(base_version), kem, base64.b64encode(sealed).decode(), "")
        return cls(**{**asdict(env), "signature": base64.b64encode(key.sign(env.signed_bytes())).decode()})

    def check(self, public_key: Ed25519PublicKey) -> None:
        if self.kem not in KEMS:
            raise BadInput(f"unknown KEM {self.kem!r}")
        if not NAME_RE.match(self.update_id.replace(":", "-")[:64]) or len(self.update_id) > 128:
            raise BadInput("update id is malformed")
        try:
            public_key.verify(base64.b64decode(self.signature, validate=True), self.signed_bytes())
        except (InvalidSignature, ValueError):
            raise AuthError("update signature does not verify with the clinic's key") from None
