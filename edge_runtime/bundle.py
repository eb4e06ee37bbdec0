"""Signed model bundles (DESIGN §6): write atomically, verify before anything is loaded.

A bundle is a directory with ``manifest.json`` and the files it lists. The manifest carries every
file's SHA-256 and size and an Ed25519 signature over its canonical JSON (sorted keys, no spaces,
without the ``signature`` member). Loading checks the signer against a pinned public key, the
signature, then every file; any mismatch refuses the whole bundle.
"""

from __future__ import annotations

import base64
import json
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .errors import BundleError
from .fsutil import fsync_tree, replace_dir, sha256_file, temp_path
from .keys import key_id
from .preprocess import Preprocessing

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def canonical_json(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def sign_manifest(body: dict, key: Ed25519PrivateKey) -> dict:
    """Return ``body`` with a ``signature`` member over its canonical form."""
    unsigned = {k: v for k, v in body.items() if k != "signature"}
    sig = key.sign(canonical_json(unsigned))
    return {
        **unsigned,
        "signature": {"algorithm": "Ed25519", "key_id": key_id(key.public_key()), "value": base64.b64encode(sig).decode()},
    }


def default_public_key_path(bundle_dir: Path) -> Path:
    """Where ``edge-export`` writes the public key: next to the bundle directory."""
    bundle_dir = Path(bundle_dir)
    return bundle_dir.with_name(bundle_dir.name + ".pub")


def write_bundle(out_dir: Path, files: dict[str, Path], body: dict, key: Ed25519PrivateKey) -> Path:
    """Copy ``files`` (bundle-relative name -> source path) into a new bundle at ``out_dir``.

    The bundle is assembled in a temporary sibling directory, fsynced and renamed into place, so a
    crash leaves either the previous bundle or the new one, never a half-written one.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out_dir)
    try:
        listing = {}
        for name, src in sorted(files.items()):
            _check_member_name(name)
            dest = tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            listing[name] = {"sha256": sha256_file(dest), "size": dest.stat().st_size}
        manifest = sign_manifest({**body, "format_version": FORMAT_VERSION, "files": listing}, key)
        (tmp / MANIFEST).write_bytes(json.dumps(manifest, indent=2, sort_keys=True).encode())
        fsync_tree(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: only :func:`load_bundle` makes these."""

    root: Path
    manifest: dict
    preprocessing: Preprocessing

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def model_version(self) -> str:
        return str(self.manifest["model_version"])


def load_bundle(root: Path, trusted_key: Ed25519PublicKey) -> Bundle:
    """Verify signer, signature and every file of the bundle at ``root``; refuse on any mismatch."""
    root = Path(root)
    manifest_path = root / MANIFEST
    check_bundle_folder(root)
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except FileNotFoundError as exc:
        raise BundleError(f"{manifest_path}: bundle has no manifest") from exc
    except (OSError, ValueError) as exc:
        raise BundleError(f"{manifest_path}: manifest is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path}: manifest is not a JSON object")
    _verify_signature(manifest, manifest_path, trusted_key)
    _check_structure(manifest, manifest_path)
    for name, meta in manifest["files"].items():
        _check_member_name(name)
        path = root / name
        if not path.is_file():
            raise BundleError(f"{path}: file listed in the manifest is missing")
        if path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
            raise BundleError(f"{path}: file does not match its SHA-256 in the manifest (tampered or corrupt)")
    return Bundle(root=root, manifest=manifest, preprocessing=Preprocessing.from_dict(manifest["preprocessing"]))


ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2", ".zip")


def check_bundle_folder(root: Path) -> None:
    """A bundle is a folder: say so when a file (an archive, most often) is given in its place."""
    root = Path(root)
    if root.is_dir():
        return
    if not root.exists():
        raise BundleError(f"{root}: bundle directory does not exist")
    unpack = ""
    if root.name.lower().endswith(ARCHIVE_SUFFIXES):
        tool = "unzip" if root.name.lower().endswith(".zip") else "tar -xf"
        unpack = f"; unpack it first ({tool} {root.name}) and give the folder it holds"
    raise BundleError(f"{root}: is a file, not a bundle: bundles are folders (manifest.json and the files it lists){unpack}")


def _check_structure(manifest: dict, where: Path) -> None:
    """Types of the members the runtime relies on; a signed manifest can still be malformed."""
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise BundleError(f"{where}: unsupported bundle format {version!r} (this runtime reads {FORMAT_VERSION})")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(m, dict) and isinstance(m.get("sha256"), str) and type(m.get("size")) is int for m in files.values()
    ):
        raise BundleError(f"{where}: manifest file list is malformed")
    expected = {"preprocessing": dict, "classes": list, "model_version": str}
    for key, kind in expected.items():
        if not isinstance(manifest.get(key), kind):
            raise BundleError(f"{where}: manifest member {key!r} is missing or not a {kind.__name__}")
    if not manifest["classes"] or not all(isinstance(c, str) for c in manifest["classes"]):
        raise BundleError(f"{where}: manifest classes must be a non-empty list of names")


def _verify_signature(manifest: dict, where: Path, trusted_key: Ed25519PublicKey) -> None:
    sig = manifest.get("signature")
    if not isinstance(sig, dict) or sig.get("algorithm") != "Ed25519":
        raise BundleError(f"{where}: manifest is not signed with Ed25519")
    if sig.get("key_id") != key_id(trusted_key):
        raise BundleError(f"{where}: bundle was signed by key {str(sig.get('key_id'))[:16]}…, not by the trusted key")
    unsigned = {k: v for k, v in manifest.items() if k != "signature"}
    try:
        trusted_key.verify(base64.b64decode(sig.get("value", ""), validate=True), canonical_json(unsigned))
    except (InvalidSignature, ValueError) as exc:
        raise BundleError(f"{where}: manifest signature is invalid (tampered manifest)") from exc


def _check_member_name(name: str) -> None:
    """Bundle members are plain relative paths: no absolute paths, no '..'."""
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise BundleError(f"bundle member name {name!r} is not a safe relative path")
