import json
import os
import stat

import pytest

from edge_runtime.bundle import (
    MANIFEST,
    default_public_key_path,
    load_bundle,
    write_bundle,
)
from edge_runtime.errors import BundleError
from edge_runtime.keys import (
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    save_private_key,
    save_public_key,
)
from edge_runtime.preprocess import CTSpec, GenomicsSpec, PathologySpec, Preprocessing

PRE = Preprocessing(CTSpec((2, 2, 2), (1.0, 1.0, 1.0)), PathologySpec(4, (0.5,) * 3, (0.2,) * 3), GenomicsSpec(("A",), (0.0,), (1.0,)))


@pytest.fixture
def key():
    return generate_key()


@pytest.fixture
def bundle(tmp_path, key):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.onnx").write_bytes(b"encoder weights")
    (tmp_path / "src" / "h.onnx").write_bytes(b"head weights")
    body = {"model_version": "7", "classes": ["neg", "pos"], "preprocessing": PRE.to_dict(), "metrics": {"auc": 0.9}}
    files = {"encoders/a.onnx": tmp_path / "src" / "a.onnx", "head.onnx": tmp_path / "src" / "h.onnx"}
    return write_bundle(tmp_path / "bundle", files, body, key)


def test_roundtrip_verifies(bundle, key):
    loaded = load_bundle(bundle, key.public_key())
    assert loaded.model_version == "7" and loaded.classes == ["neg", "pos"] and loaded.preprocessing == PRE
    meta = loaded.manifest["files"]["encoders/a.onnx"]
    assert meta["size"] == len(b"encoder weights") and len(meta["sha256"]) == 64
    assert loaded.manifest["signature"]["key_id"] == key_id(key.public_key())
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")], "no temporary left behind"


def test_tampered_file_refused(bundle, key):
    (bundle / "encoders" / "a.onnx").write_bytes(b"encoder weightz")
    with pytest.raises(BundleError, match="a.onnx.*SHA-256"):
        load_bundle(bundle, key.public_key())


def test_tampered_manifest_refused(bundle, key):
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["metrics"]["auc"] = 0.99
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="signature is invalid"):
        load_bundle(bundle, key.public_key())


def test_other_signer_refused(bundle):
    with pytest.raises(BundleError, match="not by the trusted key"):
        load_bundle(bundle, generate_key().public_key())


def test_forged_signature_refused(bundle, key):
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["signature"]["value"] = "AAAA" + manifest["signature"]["value"][4:]
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="signature is invalid"):
        load_bundle(bundle, key.public_key())


@pytest.mark.parametrize("damage", ["missing_file", "missing_manifest", "garbage_manifest", "no_dir"])
def test_incomplete_bundle_refused(bundle, key, damage):
    if damage == "missing_file":
        os.remove(bundle / "head.onnx")
    elif damage == "missing_manifest":
        os.remove(bundle / MANIFEST)
    elif damage == "garbage_manifest":
        (bundle / MANIFEST).write_bytes(b"\x00{not json")
    else:
        bundle = bundle.parent / "nowhere"
    with pytest.raises(BundleError):
        load_bundle(bundle, key.public_key())


@pytest.mark.parametrize("name", ["../evil.onnx", "/etc/passwd", "a/../../b"])
def test_unsafe_member_names_refused_on_write(tmp_path, key, name):
    src = tmp_path / "x"
    src.write_bytes(b"x")
    with pytest.raises(BundleError, match="safe relative path"):
        write_bundle(tmp_path / "b", {name: src}, {"preprocessing": PRE.to_dict()}, key)
    assert not (tmp_path / "b").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b")]


def test_failed_write_leaves_old_bundle_intact(bundle, key, tmp_path):
    before = (bundle / MANIFEST).read_bytes()
    with pytest.raises(FileNotFoundError):
        write_bundle(bundle, {"head.onnx": tmp_path / "does-not-exist"}, {"preprocessing": PRE.to_dict()}, key)
    assert (bundle / MANIFEST).read_bytes() == before
    assert load_bundle(bundle, key.public_key()).model_version == "7"


def test_key_files(tmp_path, key):
    save_private_key(key, tmp_path / "k.pem")
    save_public_key(key.public_key(), tmp_path / "k.pub")
    assert stat.S_IMODE(os.stat(tmp_path / "k.pem").st_mode) == 0o600
    assert key_id(load_private_key(tmp_path / "k.pem").public_key()) == key_id(load_public_key(tmp_path / "k.pub"))
    assert default_public_key_path(tmp_path / "bundle") == tmp_path / "bundle.pub"


def test_archive_given_as_bundle_says_bundles_are_folders(tmp_path, bundle, key):
    # Regression (issue 14 item 10d): a .tar was answered "bundle directory does not exist".
    import tarfile

    from click.testing import CliRunner

    from edge_runtime.cli import main

    with tarfile.open(tmp_path / "model.tar", "w") as tar:
        tar.add(bundle, arcname="bundle")
    with pytest.raises(BundleError, match=r"model.tar: is a file, not a bundle: bundles are folders .* unpack it first \(tar -xf model.tar\)"):
        load_bundle(tmp_path / "model.tar", key.public_key())
    # the CLI says it before looking for the default key model.tar.pub, which is not there either
    result = CliRunner().invoke(main, ["infer", "--bundle", str(tmp_path / "model.tar"), "--synthetic", "--case-id", "1",
                                       "--state", str(tmp_path / "state")])
    assert result.exit_code == 2 and "bundles are folders" in result.output and ".pub" not in result.output
    with pytest.raises(BundleError, match="bundle directory does not exist"):
        load_bundle(tmp_path / "nowhere", key.public_key())
