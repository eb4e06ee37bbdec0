"""The clinic's state folder: identity, fine-tuned heads with rollback, and the outbox of updates.

    STATE/clinic.json                 clinic id (random, made on first use) and the datasets with a ledger
    STATE/privacy/DATASET/ledger.*    the privacy ledger (edge_runtime.privacy.ledger)
    STATE/cache/KEY/                  embedding cache (edge_runtime.finetune.cache)
    STATE/heads/BUNDLEHEAD/           head-ROUND.npz files and heads.json (history; the last is active)
    STATE/outbox/UPDATE.npz           updates ready for sync (delta + metadata)

Every file is written atomically (temporary name, fsync, rename); heads.json is replaced last, so a
crash leaves the previous active head in force. Default folder: $EDGE_RUN_STATE or ~/.dwfl-edge.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path


from ..bundle import Bundle
from ..errors import BadInput, Refused
from ..fsutil import sha256_file, write_atomic
from .head import Params, check_params, load_params, params_bytes

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(value: str, what: str) -> str:
    if not _NAME.match(value):
        raise BadInput(f"{what} {value!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return value


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class State:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise BadInput(f"{self.root}: state folder is not a directory")

    # ------------------------------------------------------------ identity

    def clinic(self, create: bool = True) -> dict:
        path = self.root / "clinic.json"
        if path.exists():
            try:
                doc = json.loads(path.read_text())
                check_name(doc["clinic_id"], "clinic id")
                if not isinstance(doc.get("datasets", []), list):
                    raise ValueError("datasets is not a list")
                return doc
            except (OSError, ValueError, KeyError, TypeError, BadInput) as exc:
                raise BadInput(f"{path}: clinic identity is corrupt ({exc})") from exc
        doc = {"clinic_id": f"clinic-{uuid.uuid4().hex[:12]}", "created_utc": now_utc(), "datasets": []}
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(doc, indent=2).encode(), mode=0o600)
        return doc

    def register_dataset(self, dataset: str) -> None:
        """Recorded before a dataset's first charge: a ledger that later disappears is noticed."""
        doc = self.clinic()
        if dataset not in doc["datasets"]:
            doc["datasets"] = sorted([*doc["datasets"], dataset])
            write_atomic(self.root / "clinic.json", json.dumps(doc, indent=2).encode(), mode=0o600)

    def ledger_folder(self, dataset: str) -> Path:
        return self.root / "privacy" / check_name(dataset, "dataset")

    # ------------------------------------------------------------ heads

    def heads_folder(self, bundle: Bundle) -> Path:
        return self.root / "heads" / bundle_head_key(bundle)[:24]

    def history(self, bundle: Bundle) -> list[dict]:
        path = self.heads_folder(bundle) / "heads.json"
        if not path.exists():
            return []
        try:
            doc = json.loads(path.read_text())
            if doc["bundle_head"] != bundle_head_key(bundle):
                raise ValueError("written for another bundle head")
            return list(doc["history"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BadInput(f"{path}: head history is corrupt ({exc})") from exc

    def _write_history(self, bundle: Bundle, history: list[dict]) -> None:
        folder = self.heads_folder(bundle)
        folder.mkdir(parents=True, exist_ok=True)
        doc = {"bundle_head": bundle_head_key(bundle), "model_version": bundle.model_version, "history": history}
        write_atomic(folder / "heads.json", json.dumps(doc, indent=2).encode())

    def active_head(self, bundle: Bundle, dim: int, n_classes: int) -> tuple[Params | None, dict | None]:
        """The fine-tuned head in force for this bundle, verified against its recorded SHA-256; None
        when the bundle's own head is in force."""
        history = self.history(bundle)
        if not history:
            return None, None
        entry = history[-1]
        path = self.heads_folder(bundle) / entry["file"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise BadInput(f"{path}: active fine-tuned head is missing or does not match its SHA-256 (run `edge-run rollback`)")
        return load_params(path, dim, n_classes), entry

    def activate(self, bundle: Bundle, params: Params, round_id: str, info: dict) -> dict:
        folder = self.heads_folder(bundle)
        folder.mkdir(parents=True, exist_ok=True)
        data = params_bytes(params)
        name = f"head-{round_id}.npz"
        write_atomic(folder / name, data)
        entry = {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "round_id": round_id, "time_utc": now_utc(), **info}
        self._write_history(bundle, [*self.history(bundle), entry])  # the switch: one atomic rename
        return entry

    def rollback(self, bundle: Bundle) -> dict | None:
        """Drop the active fine-tuned head; the one before it (or the bundle's) is in force again.
        Returns the head now active (None: the bundle's own)."""
        history = self.history(bundle)
        if not history:
            raise NothingToRollBack(f"{self.heads_folder(bundle)}: no fine-tuned head is active for this bundle; nothing to roll back")
        self._write_history(bundle, history[:-1])
        return history[-2] if len(history) > 1 else None

    # ------------------------------------------------------------ outbox

    def write_update(self, update_id: str, delta: Params, meta: dict) -> Path:
        from ..sync import update as codec

        return codec.write(self.root / "outbox" / f"{update_id}.npz", delta, meta)


class NothingToRollBack(Refused):
    """Exit 1: a refusal, not bad input."""


def bundle_head_key(bundle: Bundle) -> str:
    """The bundle's head weights (SHA-256 from its verified manifest) and model version."""
    weights = bundle_head_weights_name(bundle)
    body = f"{bundle.model_version}\n{bundle.manifest['files'][weights]['sha256']}"
    return hashlib.sha256(body.encode()).hexdigest()


def bundle_head_weights_name(bundle: Bundle) -> str:
    head = bundle.manifest.get("head")
    name = head.get("weights") if isinstance(head, dict) else None
    if not isinstance(name, str) or name not in bundle.manifest["files"]:
        raise BadInput(f"{bundle.root}: bundle has no head weights (head.npz) to fine-tune; rebuild it with this version of edge-export")
    return name


def bundle_head(bundle: Bundle) -> tuple[Params, int, int]:
    """The bundle's head weights, checked against its embedding dim and class count."""
    dim, n_classes = int(bundle.manifest["embedding_dim"]), len(bundle.classes)
    params = load_params(bundle.path(bundle_head_weights_name(bundle)), dim, n_classes)
    return check_params(params, dim, n_classes, str(bundle.path("head.npz"))), dim, n_classes


def read_update(path: Path) -> tuple[Params, dict]:
    from ..sync import update as codec

    u = codec.read(path)
    return u.delta, u.meta
