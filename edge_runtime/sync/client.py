"""The clinic side of sync (``edge-run enroll`` / ``edge-run sync``), over plain HTTP(S) with httpx.
Every file lives where ClinicState (edge_runtime.state) says:

    sync/clinic_ed25519.pem   the clinic's signing key (0600), made at enrollment
    sync/server.json          server URL, clinic name, pinned server keys (Ed25519, HPKE), KEM
    sync/server.pub           the pinned server key as PEM (what bundles are verified with)
    sync/pending/ID.json      an outbox update waiting for upload: its round and base version
    sync/sent/ID.json         uploaded updates (the server's answer)
    bundles/vN/               verified global model versions (the current one and the one before
                              it); bundles/current.json names the current one

Enrollment makes the enrolled name the clinic's one id (clinic.json), see ClinicState.

A sync: upload what is pending; pull the latest version (signature and hashes verified before it is
installed); if the open round has nothing from us yet, fine-tune with DP on the labelled manifest,
seal the update with HPKE to the pinned server key, sign and upload it. Uploads retry with
exponential backoff; the update id makes a retry after a timeout idempotent.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..bundle import (
    MANIFEST,
    Bundle,
    _check_member_name,
    _verify_signature,
    load_bundle,
)
from ..errors import BadInput, BundleError, Refused
from ..fsutil import fsync_tree, replace_dir, temp_path, write_atomic
from ..keys import (
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    save_private_key,
    save_public_key,
)
from ..progress import progress
from ..state import ClinicState, as_state, bundle_head_key
from . import protocol, update as codec
from .hpke import DEFAULT_KEM, KEMS, HpkePublic

RETRY_STATUS = {500, 502, 503, 504}


@dataclass
class SyncConfig:
    url: str
    clinic: str
    server_key_id: str
    hpke_public: dict
    kem: str = DEFAULT_KEM


class Client:
    def __init__(self, state: ClinicState | Path, url: str | None = None, retries: int = 5, backoff: float = 0.5,
                 timeout: float = 30.0) -> None:
        self.state = as_state(state)
        cfg_path = self.state.server_config_file
        if not cfg_path.exists():
            raise BadInput(f"{self.state.root}: this clinic is not enrolled (run `edge-run enroll --server URL --token T`)")
        try:
            self.config = SyncConfig(**json.loads(cfg_path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise BadInput(f"{cfg_path}: unreadable sync configuration ({exc})") from exc
        self.url = (url or self.config.url).rstrip("/")
        self.key = load_private_key(self.state.clinic_key_file)
        self.server_key = load_public_key(self.state.server_key_file)
        if key_id(self.server_key) != self.config.server_key_id:
            raise BadInput(f"{self.state.sync_dir}: pinned server key does not match its recorded fingerprint")
        self.hpke = HpkePublic.from_dict(self.config.hpke_public)
        self.retries, self.backoff = retries, backoff
        self.http = httpx.Client(base_url=self.url, timeout=timeout)

    # ------------------------------------------------------------ requests

    def request(self, method: str, path: str, body: bytes = b"", retry: bool = True) -> httpx.Response:
        attempts = self.retries + 1 if retry else 1
        last = ""
        for attempt in range(attempts):
            headers = protocol.sign_request(self.key, self.config.clinic, method, path, body)  # fresh nonce each try
            if body:
                headers["Content-Type"] = "application/json"
            try:
                resp = self.http.request(method, path, content=body, headers=headers)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code not in RETRY_STATUS:
                    return resp
                last = f"HTTP {resp.status_code}: {reason(resp)}"
            if attempt + 1 < attempts:
                time.sleep(self.backoff * 2**attempt * (1 + 0.25 * random.random()))
        raise Refused(f"server {self.url} unreachable or busy after {attempts} tries ({last})")

    def get_json(self, path: str) -> dict:
        resp = self.request("GET", path)
        if resp.status_code != 200:
            raise Refused(f"{path}: server refused (HTTP {resp.status_code}): {reason(resp)}")
        return resp.json()

    # ------------------------------------------------------------ model versions

    def current(self) -> tuple[int, Path] | None:
        return self.state.current_version()

    def pull(self, version: int) -> Bundle:
        """Download version ``version`` (files we already hold are copied), verify it, install it
        under bundles/vN. It goes live only through ``activate`` (sync scores it first)."""
        folder = self.state.version_dir(version)
        if folder.is_dir() and (folder / MANIFEST).is_file():
            try:
                return load_bundle(folder, self.server_key)
            except BundleError:
                shutil.rmtree(folder, ignore_errors=True)  # damaged on disk: fetched again below
        resp = self.request("GET", f"/v1/bundle/{version}/manifest.json")
        if resp.status_code != 200:
            raise Refused(f"cannot fetch version {version}: HTTP {resp.status_code}: {reason(resp)}")
        raw = resp.content
        try:
            manifest = json.loads(raw)
            if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
                raise ValueError("not a manifest")
        except ValueError as exc:
            raise BundleError(f"server sent an unreadable manifest for version {version} ({exc})") from exc
        _verify_signature(manifest, Path(f"server version {version}"), self.server_key)  # before any download
        local = {}  # files this clinic already holds, from every installed version (held-back ones too)
        for have in sorted(self.state.bundles_dir.glob("v*")):
            if (have / MANIFEST).is_file():
                try:
                    local.update({m["sha256"]: have / n for n, m in json.loads((have / MANIFEST).read_text())["files"].items()})
                except (OSError, ValueError, KeyError, TypeError, AttributeError):
                    continue  # unreadable: its files are fetched instead
        tmp = temp_path(folder)
        try:
            with progress(f"model version {version}", len(manifest["files"])) as advance:
                for name, meta in manifest["files"].items():
                    _check_member_name(name)
                    dest = tmp / name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    src = local.get(meta.get("sha256"))
                    if src is not None and src.is_file():
                        shutil.copyfile(src, dest)
                    else:
                        r = self.request("GET", f"/v1/bundle/{version}/files/{name}")
                        if r.status_code != 200:
                            raise Refused(f"cannot fetch {name} of version {version}: HTTP {r.status_code}: {reason(r)}")
                        dest.write_bytes(r.content)
                    advance(1)
            (tmp / MANIFEST).write_bytes(raw)
            load_bundle(tmp, self.server_key)  # signature and every file's SHA-256
            fsync_tree(tmp)  # on disk before the rename makes it a version (power loss, not only kill -9)
            replace_dir(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return load_bundle(folder, self.server_key)

    def activate(self, version: int) -> None:
        """Make an installed version the one in use (the one it replaces is kept for a rollback)."""
        cur = self.current()
        self.state.set_current_version(version, self.state.version_dir(version))
        self.prune(previous=cur[0] if cur else None)

    def prune(self, previous: int | None = None) -> None:
        """Keep the version in use, the one it replaced (``previous``, else the last one versions.json
        marks replaced) and the newest pulled (the base of the open round, even when held back); the
        other folders go."""
        cur = self.current()
        if previous is None:
            previous = max((int(e["version"]) for e in self.state.version_log() if e.get("status") == "replaced"), default=None)
        installed = [int(f.name[1:]) for f in self.state.bundles_dir.glob("v*") if f.is_dir() and f.name[1:].isdigit()]
        keep = {v for v in (cur[0] if cur else None, previous, max(installed, default=None)) if v is not None}
        for v in installed:
            if v not in keep:
                shutil.rmtree(self.state.version_dir(v), ignore_errors=True)

    # ------------------------------------------------------------ updates

    def queue(self, update_path: Path, round_id: int, base_version: int) -> Path:
        pending = self.state.pending_dir
        pending.mkdir(parents=True, exist_ok=True)
        side = pending / (Path(update_path).stem + ".json")
        write_atomic(side, json.dumps({"file": str(update_path), "round": round_id, "base_version": base_version}).encode())
        return side

    def unsent_update(self, bundle: Bundle) -> Path | None:
        """An outbox update fine-tuned on ``bundle``'s head that was never queued (its run died between
        writing it and queueing it, or `edge-run finetune` made it): sending it costs no new privacy."""
        known = {p.stem for folder in (self.state.pending_dir, self.state.sent_dir) for p in folder.glob("*.json")}
        key = bundle_head_key(bundle)
        for path in sorted(self.state.outbox(), key=lambda p: p.stat().st_mtime, reverse=True):
            if path.stem in known:
                continue
            try:
                meta = codec.read(path).meta
            except BadInput:
                continue  # not ours to judge here; the server would refuse it anyway
            if meta.get("base_head") == key and meta.get("update_id") == path.stem:
                return path
        return None

    def upload_pending(self) -> list[dict]:
        out = []
        sides = sorted(self.state.pending_dir.glob("*.json"))
        with progress("upload", len(sides)) as advance:
            for side in sides:
                out.append(self._upload_side(side))
                advance(1)
        return out

    def _upload_side(self, side: Path) -> dict:
        """Upload one queued update; the answer is recorded under sent/ before the queue entry goes."""
        doc = json.loads(side.read_text())
        result = self.upload(Path(doc["file"]), side.stem, int(doc["round"]), int(doc["base_version"]))
        sent = self.state.sent_dir
        sent.mkdir(parents=True, exist_ok=True)
        write_atomic(sent / side.name, json.dumps({**doc, **result}).encode())
        side.unlink()
        if result.get("status") in ("stored", "already have it"):
            Path(doc["file"]).unlink(missing_ok=True)  # the outbox copy is no longer needed
        return result

    def upload(self, path: Path, update_id: str, round_id: int, base_version: int) -> dict:
        env = codec.seal(Path(path).read_bytes(), key=self.key, hpke_public=self.hpke, update_id=update_id,
                         clinic=self.config.clinic, round_id=round_id, base_version=base_version, kem=self.config.kem)
        resp = self.request("POST", "/v1/updates", env.to_json())
        if resp.status_code == 200:
            return {"update_id": update_id, **resp.json()}
        return {"update_id": update_id, "status": "refused", "http": resp.status_code, "reason": reason(resp)}


def reason(resp: httpx.Response) -> str:
    try:
        doc = resp.json()
        return str(doc.get("error") or doc.get("detail") or doc)[:300]
    except ValueError:
        return resp.text[:300]


def enroll(state: ClinicState | Path, url: str, token: str, kem: str = DEFAULT_KEM, timeout: float = 30.0,
           tier: str = "clinic") -> dict:
    """Register a fresh clinic key with the token; pin the server key the token names. The enrolled
    name becomes the clinic's one id (refused before the token is spent when it cannot). A hospital
    (``edge-export enroll``) enrolls the same way with ``tier="hospital"``; a token of the other tier
    is refused here, before it is spent."""
    if kem not in KEMS:
        raise BadInput(f"unknown KEM {kem!r}: choose one of {', '.join(KEMS)}")
    state = as_state(state)
    clinic, _, fpr, token_tier = protocol.parse_token(token)
    if token_tier != tier:
        how = "`edge-export enroll` (the hospital client)" if token_tier == "hospital" else "`edge-run enroll` (the clinic client)"
        raise BadInput(f"this token enrolls a {token_tier}, not a {tier}: use {how}")
    state.check_enrollment(clinic)
    sync_dir = state.sync_dir
    sync_dir.mkdir(parents=True, exist_ok=True)
    key = generate_key()
    from cryptography.hazmat.primitives import serialization

    pub_raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    body = json.dumps({"token": token, "public_key": base64.b64encode(pub_raw).decode()}).encode()
    headers = {**protocol.sign_request(key, clinic, "POST", "/v1/enroll", body), "Content-Type": "application/json"}
    try:
        resp = httpx.post(url.rstrip("/") + "/v1/enroll", content=body, headers=headers, timeout=timeout)
    except httpx.TransportError as exc:
        raise Refused(f"server {url} unreachable ({exc})") from exc
    if resp.status_code != 200:
        raise Refused(f"enrollment refused (HTTP {resp.status_code}): {reason(resp)}")
    doc = resp.json()
    try:
        server_key = Ed25519PublicKey.from_public_bytes(base64.b64decode(doc["server_key"], validate=True))
        hpke_pub = HpkePublic.from_dict(doc["hpke_public"])
        server_key.verify(base64.b64decode(doc["hpke_signature"], validate=True), hpke_pub.canonical())
    except Exception as exc:  # noqa: BLE001
        raise Refused(f"enrollment answer is malformed or its HPKE key is not signed by the server key ({exc!r})") from exc
    if key_id(server_key) != fpr:
        raise Refused("the server's key does not match the fingerprint in the token (wrong server or interception); nothing saved")
    save_private_key(key, state.clinic_key_file)
    save_public_key(server_key, state.server_key_file)
    cfg = SyncConfig(url=url.rstrip("/"), clinic=clinic, server_key_id=fpr, hpke_public=hpke_pub.to_dict(), kem=kem)
    write_atomic(state.server_config_file, json.dumps(cfg.__dict__, indent=2).encode(), mode=0o600)
    state.adopt_enrolled_name(clinic)
    return {"clinic": clinic, "tier": tier, "server_key_id": fpr, "kem": kem, "state": str(sync_dir)}


def contributed(state: ClinicState | Path, round_id: int) -> str | None:
    """The update id this clinic already queued or sent for a round, if any."""
    state = as_state(state)
    for folder in (state.pending_dir, state.sent_dir):
        for side in folder.glob("*.json"):
            try:
                doc = json.loads(side.read_text())
            except ValueError:
                continue
            if int(doc.get("round", -1)) == round_id and doc.get("status", "stored") != "refused":
                return side.stem
    return None
