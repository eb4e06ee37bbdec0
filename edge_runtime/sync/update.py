"""The update format, one home: a clinic's head delta plus its released metadata (DESIGN §8).

    UPDATE.npz     delta/NAME (float32, one per head parameter) + meta.json (UTF-8 JSON, uint8 array)

Written by the clinic (``write``), opened by the server (``decode`` + ``validate`` against the head
of the version it was trained on), sealed with HPKE to the server key and signed by the clinic
(``seal``), opened on arrival (``open_envelope``). Everything else (clinic state, server, tests,
benchmarks) goes through these functions.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .. import MODALITIES
from ..errors import BadInput
from ..finetune.head import l2_norm as norm  # the norm aggregation clips by: one definition
from ..fsutil import write_atomic
from .hpke import HpkePrivate, HpkePublic, open_sealed, seal as hpke_seal, update_info
from .protocol import Envelope

Params = dict[str, np.ndarray]
DELTA_PREFIX = "delta/"
META = "meta.json"
MAX_N = 10**9


class UpdateError(BadInput):
    """An update that cannot be read or does not fit the model it claims to change."""


@dataclass(frozen=True, kw_only=True)
class Bounds:
    """What a clinic may claim, set by the federation (the server's configuration): checked on arrival.

    max_n: cases one update may claim (its n is released noised, std 2 x meta noise, about 40-57);
    min_noise_multiplier: the DP-SGD sigma an update must have been trained with (a real clinic's
    plan never picks less than accountant.SIGMA_MIN); max_abs: |delta| of any one parameter."""

    max_n: int = MAX_N
    min_noise_multiplier: float = 0.0
    max_abs: float = float("inf")

    def __post_init__(self) -> None:
        if not (isinstance(self.max_n, int) and 1 <= self.max_n <= MAX_N):
            raise BadInput(f"max_n = {self.max_n!r} is out of range [1, {MAX_N}]")
        if not (np.isfinite(self.min_noise_multiplier) and self.min_noise_multiplier >= 0):
            raise BadInput(f"min_noise_multiplier = {self.min_noise_multiplier!r} is out of range [0, inf)")
        if not self.max_abs > 0:  # inf allowed: no bound
            raise BadInput(f"max_update_abs = {self.max_abs!r} is out of range (0, inf]")


@dataclass(frozen=True)
class Update:
    delta: Params
    meta: dict


@dataclass(frozen=True)
class Summary:
    """What aggregation needs of a validated update, computed once when it arrives."""

    n: int
    val_loss: float
    modality_fraction: dict[str, float] = field(default_factory=dict)
    noise_multiplier: float = 0.0
    norm: float = 0.0  # L2 norm of the whole delta (float64 sums)
    sha256_plain: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> "Summary":
        return cls(n=int(doc["n"]), val_loss=float(doc["val_loss"]), modality_fraction=dict(doc.get("modality_fraction", {})),
                   noise_multiplier=float(doc.get("noise_multiplier", 0.0)), norm=float(doc.get("norm", 0.0)),
                   sha256_plain=str(doc.get("sha256_plain", "")))


# ------------------------------------------------------------------ bytes and files


def encode(delta: Params, meta: dict) -> bytes:
    arrays = {f"{DELTA_PREFIX}{k}": np.asarray(v, dtype=np.float32) for k, v in sorted(delta.items())}
    arrays[META] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode(data: bytes, max_bytes: int | None = None) -> Update:
    """Parse update bytes; ``max_bytes`` bounds the uncompressed size (checked before numpy reads)."""
    try:
        if max_bytes is not None:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                if sum(i.file_size for i in zf.infolist()) > max_bytes:
                    raise UpdateError("update is larger than the model it claims to change")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(bytes(z[META]).decode())
            delta = {k[len(DELTA_PREFIX):]: z[k] for k in z.files if k.startswith(DELTA_PREFIX)}
    except UpdateError:
        raise
    except Exception as exc:  # noqa: BLE001 - anything unreadable is refused, whatever numpy/zipfile raised
        raise UpdateError(f"update is not a readable .npz with {META} ({type(exc).__name__})") from None
    if not isinstance(meta, dict):
        raise UpdateError(f"update {META} is not a JSON object")
    return Update(delta, meta)


def write(path: Path, delta: Params, meta: dict) -> Path:
    """Atomically (temporary name, fsync, rename), mode 0600: it is derived from patient data."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, encode(delta, meta), mode=0o600)
    return path


def read(path: Path) -> Update:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UpdateError(f"{path}: update is unreadable ({exc})") from exc
    try:
        return decode(data)
    except UpdateError as exc:
        raise UpdateError(f"{path}: {exc}") from None


# ------------------------------------------------------------------ validation


def size_limit(reference: Params) -> int:
    return 4 * sum(v.nbytes for v in reference.values()) + 2**16


def validate(update: Update, reference: Params, update_id: str | None = None, *, bounds: Bounds = Bounds()) -> Summary:
    """Names and shapes of ``reference``, finite float values, metadata in range, within the
    federation's ``bounds`` (every bound exceeded is named); the summary that aggregation uses.
    UpdateError with the reason otherwise."""
    delta, meta = update.delta, update.meta
    if set(delta) != set(reference):
        raise UpdateError(f"update parameter names differ from the model's ({sorted(set(delta) ^ set(reference))[:3]})")
    for name, ref in reference.items():
        arr = delta[name]
        if not isinstance(arr, np.ndarray):  # an npz member not named .npy loads as raw bytes
            raise UpdateError(f"{name}: not an array")
        if arr.shape != ref.shape:
            raise UpdateError(f"wrong shape for {name}: {arr.shape} != {ref.shape}")
        if arr.dtype.kind != "f" or not np.all(np.isfinite(arr)):
            raise UpdateError(f"{name}: non-finite or non-float values")
    try:
        n, loss = int(meta["n"]), float(meta["val_loss"])
        fractions = {m: float(meta.get("modality_fraction", {}).get(m, 0.0)) for m in MODALITIES}
        sigma = float(meta.get("noise_multiplier", 0.0))
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise UpdateError(f"update metadata is malformed ({exc!r})") from None
    if not (0 < n <= MAX_N) or not np.isfinite(loss) or loss < 0 or not np.isfinite(sigma) or sigma < 0 \
            or not all(0.0 <= f <= 1.0 for f in fractions.values()):
        raise UpdateError("update metadata out of range (n > 0, finite loss >= 0, fractions in [0, 1], sigma >= 0)")
    if update_id is not None and meta.get("update_id", update_id) != update_id:
        raise UpdateError("update id inside the sealed update differs from the envelope's")
    exceeded = []
    if n > bounds.max_n:
        exceeded.append(f"claimed n = {n} exceeds the federation's cap of {bounds.max_n} cases per update")
    if sigma < bounds.min_noise_multiplier:
        exceeded.append(f"noise_multiplier = {sigma:g} is below the federation's minimum {bounds.min_noise_multiplier:g} "
                        "(an update without its DP noise)")
    top = max(((float(np.max(np.abs(v))) if v.size else 0.0), k) for k, v in delta.items()) if delta else (0.0, "")
    if top[0] > bounds.max_abs:
        exceeded.append(f"{top[1]}: |delta| up to {top[0]:.3g} exceeds the federation's bound {bounds.max_abs:g} per parameter")
    if exceeded:
        raise UpdateError("update refused: " + "; ".join(exceeded))
    total = norm(delta)
    if not np.isfinite(total):
        raise UpdateError("update norm is not finite")
    return Summary(n=n, val_loss=loss, modality_fraction=fractions, noise_multiplier=sigma, norm=total)


# ------------------------------------------------------------------ sealing


def seal(data: bytes, *, key: Ed25519PrivateKey, hpke_public: HpkePublic, update_id: str, clinic: str, round_id: int,
         base_version: int, kem: str) -> Envelope:
    """HPKE-seal update bytes to the server, the ``info`` binding clinic, round, base version and
    update id, and sign the sealed bytes with the clinic key."""
    info = update_info(clinic, round_id, base_version, update_id, kem)
    return Envelope.build(key, update_id, clinic, round_id, base_version, kem, hpke_seal(data, hpke_public, info, kem))


def open_envelope(env: Envelope, hpke_private: HpkePrivate) -> bytes:
    """The plaintext update bytes (SealError when tampered or bound to something else)."""
    return open_sealed(env.sealed_bytes(), hpke_private, env.info(), env.kem)


def unseal(sealed: bytes, hpke_private: HpkePrivate, *, clinic: str, round_id: int, base_version: int, update_id: str,
           kem: str) -> bytes:
    """The plaintext of sealed bytes stored without their envelope (the server's blobs)."""
    return open_sealed(sealed, hpke_private, update_info(clinic, round_id, base_version, update_id, kem), kem)
