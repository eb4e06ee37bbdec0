"""The clinic's state folder, one object: layout, identity, the active model, heads, outbox, pins, ledgers.

    STATE/clinic.json                 the clinic id and the datasets that have a privacy ledger
    STATE/privacy/DATASET/ledger.*    the privacy ledger of each dataset (edge_runtime.privacy.ledger)
    STATE/cache/KEY/                  embedding cache (edge_runtime.finetune.cache)
    STATE/heads/BUNDLEHEAD/           head-ROUND.npz files and heads.json (history; the last is active)
    STATE/outbox/UPDATE.npz           updates ready for sync (edge_runtime.sync.update)
    STATE/variant.json                the variant `edge-run profile --select` pinned for one bundle
    STATE/signer.pub                  the bundle signer's key, pinned at its first verified use
    STATE/sync/                       enrollment: clinic_ed25519.pem, server.json, server.pub (the pinned
                                      server key), pending/ID.json and sent/ID.json (uploads)
    STATE/bundles/vN/, current.json   verified global model versions pulled from the server; current.json
                                      names the one in use
    STATE/versions.json               each pulled version's local validation AUC and whether it went
                                      live, was replaced or was held back (edge_runtime.sync.activation)

Every file is written atomically (temporary name, fsync, rename); heads.json is replaced last, so a
crash leaves the previous active head in force. Default folder: $EDGE_RUN_STATE or ~/.dwfl-edge.

One clinic id: ``clinic.json``'s ``clinic_id``. It is written once, by enrollment (the enrolled name)
or by the first fine-tune of a clinic not enrolled yet (a random id), and never changed afterwards:
the ledger lines, the validation split and the update ids carry it. Enrollment of a folder whose id
already has a ledger under another name is refused (ask for a token for that id), so the ledger
never breaks.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from .bundle import Bundle, check_bundle_folder, default_public_key_path, load_bundle
from .errors import BadInput, Refused
from .finetune.head import Params, check_params, load_params, params_bytes
from .fsutil import sha256_file, write_atomic
from .keys import key_id, load_public_key, save_public_key
from .variants import bundle_fingerprint, default_state_dir, pin_document, resolve_variant

if TYPE_CHECKING:
    from .model import EdgeModel
    from .privacy.ledger import Ledger

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_UPDATE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")  # CLINIC-ROUND: a file name, never a path
PIN_FILE = "variant.json"
SIGNER_FILE = "signer.pub"


def check_name(value: str, what: str) -> str:
    if not _NAME.match(value):
        raise BadInput(f"{what} {value!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return value


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ActiveHead:
    """The head a model of this bundle runs: numpy ``params``, or None for the bundle's head.onnx."""

    params: Params | None
    source: str  # "fine-tuned" | "bundle head.npz" | "bundle head.onnx"
    entry: dict | None = None  # the fine-tuned head's history entry

    @property
    def round_id(self) -> str | None:
        return self.entry["round_id"] if self.entry else None


class NothingToRollBack(Refused):
    """Exit 1: a refusal, not bad input."""


class ClinicState:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_state_dir()
        if self.root.exists() and not self.root.is_dir():
            raise BadInput(f"{self.root}: state folder is not a directory")

    # ------------------------------------------------------------ layout

    clinic_file = property(lambda self: self.root / "clinic.json")
    privacy_dir = property(lambda self: self.root / "privacy")
    cache_dir = property(lambda self: self.root / "cache")
    heads_dir = property(lambda self: self.root / "heads")
    outbox_dir = property(lambda self: self.root / "outbox")
    pin_file = property(lambda self: self.root / PIN_FILE)
    signer_file = property(lambda self: self.root / SIGNER_FILE)
    sync_dir = property(lambda self: self.root / "sync")
    clinic_key_file = property(lambda self: self.sync_dir / "clinic_ed25519.pem")
    server_config_file = property(lambda self: self.sync_dir / "server.json")
    server_key_file = property(lambda self: self.sync_dir / "server.pub")
    pending_dir = property(lambda self: self.sync_dir / "pending")
    sent_dir = property(lambda self: self.sync_dir / "sent")
    bundles_dir = property(lambda self: self.root / "bundles")
    versions_file = property(lambda self: self.root / "versions.json")  # beside bundles/, whose v* are versions

    def version_dir(self, version: int) -> Path:
        return self.bundles_dir / f"v{int(version)}"

    def ledger_folder(self, dataset: str) -> Path:
        return self.privacy_dir / check_name(dataset, "dataset")

    def heads_folder(self, bundle: Bundle) -> Path:
        return self.heads_dir / bundle_head_key(bundle)[:24]

    def update_path(self, update_id: str) -> Path:
        if not _UPDATE_ID.match(update_id):
            raise BadInput(f"update id {update_id!r} must be letters, digits, '.', '_' or '-'")
        return self.outbox_dir / f"{update_id}.npz"

    # ------------------------------------------------------------ identity

    def clinic(self, create: bool = True) -> dict:
        path = self.clinic_file
        if path.exists():
            try:
                doc = json.loads(path.read_text())
                check_name(doc["clinic_id"], "clinic id")
                if not isinstance(doc.get("datasets", []), list):
                    raise ValueError("datasets is not a list")
                return {"datasets": [], **doc}
            except (OSError, ValueError, KeyError, TypeError, BadInput) as exc:
                raise BadInput(f"{path}: clinic identity is corrupt ({exc})") from exc
        doc = {"clinic_id": f"clinic-{uuid.uuid4().hex[:12]}", "created_utc": now_utc(), "datasets": []}
        if create:
            self._write_clinic(doc)
        return doc

    @property
    def clinic_id(self) -> str:
        """The one id (made on first use)."""
        return self.clinic()["clinic_id"]

    def _write_clinic(self, doc: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.clinic_file, json.dumps(doc, indent=2).encode(), mode=0o600)

    def check_enrollment(self, name: str) -> None:
        """Before a token is spent: a folder whose id already has a ledger keeps that id."""
        if not self.clinic_file.exists():
            return
        doc = self.clinic(create=False)
        if doc["clinic_id"] != name and self.datasets():  # on disk too: a head written before its dataset was registered
            raise BadInput(f"{self.clinic_file}: this clinic is {doc['clinic_id']!r} (its privacy ledger carries that id); "
                           f"the token enrolls {name!r}: ask for a token for {doc['clinic_id']!r}")

    def adopt_enrolled_name(self, name: str) -> None:
        doc = self.clinic(create=False) if self.clinic_file.exists() else {"created_utc": now_utc(), "datasets": []}
        if doc.get("clinic_id") != name:
            self._write_clinic({**doc, "clinic_id": check_name(name, "clinic name")})

    def register_dataset(self, dataset: str) -> None:
        """Recorded before a dataset's first charge: a ledger that later disappears is noticed."""
        doc = self.clinic()
        if dataset not in doc["datasets"]:
            self._write_clinic({**doc, "datasets": sorted([*doc["datasets"], dataset])})

    # ------------------------------------------------------------ privacy ledgers

    def datasets(self) -> list[str]:
        """Every dataset with a ledger: registered in clinic.json or present on disk."""
        registered = self.clinic(create=False)["datasets"] if self.clinic_file.exists() else []
        on_disk = [p.name for p in self.privacy_dir.glob("*") if p.is_dir()]
        return sorted(set(registered) | set(on_disk))

    def ledger(self, dataset: str, *, epsilon_total: float | None = None, delta: float | None = None) -> "Ledger":
        """The dataset's ledger; its recorded budget and delta are the ones in force (a different one
        asked for is refused). A registered dataset whose ledger is gone is refused, never restarted."""
        from .privacy.ledger import Ledger, LedgerError

        folder = self.ledger_folder(dataset)
        registered = self.clinic_file.exists() and dataset in self.clinic(create=False)["datasets"]
        if registered and not Ledger.has_head(folder):
            raise LedgerError(f"{folder}: the privacy ledger of dataset {dataset!r} is missing (deleted?); refusing to start from zero")
        return Ledger(folder, self.clinic_id, dataset, epsilon_total=epsilon_total, delta=delta)

    def privacy_summaries(self) -> list[dict]:
        """Read only: nothing is created for a clinic that never fine-tuned."""
        if not self.clinic_file.exists():
            return []
        return [self.ledger(name).summary() for name in self.datasets()]

    # ------------------------------------------------------------ bundles and their signer

    def open_bundle(self, bundle_dir: Path, trusted_key: Path | None = None, *, pin: bool = False) -> Bundle:
        """Verify a bundle. The key: ``trusted_key`` when given; the enrolled server key for a version
        pulled into STATE/bundles; else BUNDLE.pub next to the bundle, which must be the signer key
        pinned here at its first verified use (pinned now when ``pin`` or the clinic has state)."""
        bundle_dir = Path(bundle_dir)
        check_bundle_folder(bundle_dir)  # before the key: BUNDLE.tar.pub "missing" would hide the real mistake
        if trusted_key is not None:
            return load_bundle(bundle_dir, load_public_key(trusted_key))
        if self.server_key_file.exists() and _inside(bundle_dir, self.bundles_dir):
            return load_bundle(bundle_dir, load_public_key(self.server_key_file))
        beside = default_public_key_path(bundle_dir)
        if self.signer_file.exists():
            pinned = load_public_key(self.signer_file)
            if beside.exists() and key_id(load_public_key(beside)) != key_id(pinned):
                raise BadInput(f"{beside}: key {key_id(load_public_key(beside))[:16]}… is not the bundle signer pinned in "
                               f"{self.signer_file} ({key_id(pinned)[:16]}…); to accept a new signer pass --trusted-key")
            return load_bundle(bundle_dir, pinned)
        key = load_public_key(beside)
        bundle = load_bundle(bundle_dir, key)
        if pin or self.clinic_file.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            save_public_key(key, self.signer_file)
        return bundle

    def current_version(self) -> tuple[int, Path] | None:
        path = self.bundles_dir / "current.json"
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text())
            return int(doc["version"]), self.bundles_dir / check_name(str(doc["folder"]), "bundle folder")
        except (OSError, ValueError, KeyError, TypeError, BadInput) as exc:
            raise BadInput(f"{path}: unreadable ({exc})") from exc

    def set_current_version(self, version: int, folder: Path) -> None:
        write_atomic(self.bundles_dir / "current.json", json.dumps({"version": int(version), "folder": folder.name}).encode())

    def version_log(self) -> list[dict]:
        """What sync decided about each pulled version (scored on the local validation split, activated
        or held back), oldest first."""
        path = self.versions_file
        if not path.exists():
            return []
        try:
            doc = json.loads(path.read_text())
            if not isinstance(doc.get("versions"), list):
                raise ValueError("no version list")
            return doc["versions"]
        except (OSError, ValueError, AttributeError):
            # a record, not a control: set aside (kept for inspection) rather than stop every sync
            path.replace(path.with_suffix(".json.unreadable"))
            return []

    def record_version(self, entry: dict) -> None:
        """Add or replace the entry of ``entry["version"]`` (atomically)."""
        log = [e for e in self.version_log() if e.get("version") != entry["version"]]
        log = sorted([*log, entry], key=lambda e: int(e["version"]))
        write_atomic(self.versions_file, json.dumps({"versions": log}, indent=1).encode())

    # ------------------------------------------------------------ variant pin

    def read_pin(self, bundle: Bundle) -> dict | None:
        path = self.pin_file
        if not path.exists():
            return None
        try:
            pin = json.loads(path.read_text())
            if not isinstance(pin, dict) or not isinstance(pin.get("variant"), str):
                raise ValueError("no variant")
        except (OSError, ValueError) as exc:
            raise BadInput(f"{path}: unreadable variant pin ({exc}); delete it or run `edge-run profile --select` again") from exc
        return pin if pin.get("bundle") == bundle_fingerprint(bundle) else None

    def write_pin(self, bundle: Bundle, variant: str, figures: dict) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.pin_file, (json.dumps(pin_document(bundle, variant, figures), indent=2) + "\n").encode())
        return self.pin_file

    def variant(self, bundle: Bundle, requested: str | None = None) -> tuple[str, str]:
        """(variant, why): --variant, else this PC's pin for this bundle, else the export's choice for this CPU."""
        pin = None if requested else self.read_pin(bundle)
        return resolve_variant(bundle, requested, pin, where=self.root)

    # ------------------------------------------------------------ heads

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

    def active_head(self, bundle: Bundle) -> ActiveHead:
        """The one decision of which head runs: this clinic's fine-tuned head for this very bundle
        head (verified against its recorded SHA-256), else the bundle's head.npz when the bundle says
        its head runs in numpy (a federated version's global head), else the bundle's head.onnx."""
        if not has_head_weights(bundle):
            return ActiveHead(None, "bundle head.onnx")
        history = self.history(bundle)
        if history:
            entry = history[-1]
            path = self.heads_folder(bundle) / entry["file"]
            if not path.is_file() or sha256_file(path) != entry["sha256"]:
                raise BadInput(f"{path}: active fine-tuned head is missing or does not match its SHA-256 (run `edge-run rollback`)")
            return ActiveHead(load_params(path, *bundle_dims(bundle)), "fine-tuned", entry)
        if bundle.manifest["head"].get("runtime") == "numpy":
            return ActiveHead(bundle_head(bundle)[0], "bundle head.npz")
        return ActiveHead(None, "bundle head.onnx")

    def model_for(self, bundle: Bundle, variant: str | None = None, threads: int = 2) -> "EdgeModel":
        """The model this PC runs for ``bundle``: the resolved encoder variant and the active head.
        ``model.variant`` / ``variant_reason`` / ``active_head`` say which and why."""
        from .model import EdgeModel

        name, why = self.variant(bundle, variant)
        head = self.active_head(bundle)
        model = EdgeModel.from_bundle(bundle, name, threads, head_params=head.params)
        model.variant_reason, model.active_head = why, head
        return model

    def activate(self, bundle: Bundle, params: Params, *, round_id: str, info: dict) -> dict:
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
        history = self.history(bundle) if has_head_weights(bundle) else []
        if not history:
            raise NothingToRollBack(f"{self.heads_dir}: no fine-tuned head is active for this bundle; nothing to roll back")
        self._write_history(bundle, history[:-1])
        return history[-2] if len(history) > 1 else None

    # ------------------------------------------------------------ outbox

    def write_update(self, update_id: str, delta: Params, meta: dict) -> Path:
        from .sync import update as codec

        return codec.write(self.update_path(update_id), delta, meta)

    def outbox(self) -> list[Path]:
        return sorted(self.outbox_dir.glob("*.npz"))


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


def as_state(state: "ClinicState | Path | str | None") -> ClinicState:
    return state if isinstance(state, ClinicState) else ClinicState(None if state is None else Path(state))


# ------------------------------------------------------------ the bundle's own head


def has_head_weights(bundle: Bundle) -> bool:
    head = bundle.manifest.get("head")
    return isinstance(head, dict) and "weights" in head


def bundle_dims(bundle: Bundle) -> tuple[int, int]:
    return int(bundle.manifest["embedding_dim"]), len(bundle.classes)


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
    dim, n_classes = bundle_dims(bundle)
    params = load_params(bundle.path(bundle_head_weights_name(bundle)), dim, n_classes)
    return check_params(params, dim, n_classes, str(bundle.path("head.npz"))), dim, n_classes


def read_update(path: Path) -> tuple[Params, dict]:
    from .sync import update as codec

    u = codec.read(path)
    return u.delta, u.meta
