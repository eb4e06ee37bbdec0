"""Property-based fuzzing: damaged bytes into every reader and parser must give a clean BadInput
(or a successful read), never another exception."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.bundle import MANIFEST, load_bundle
from edge_runtime.errors import BadInput
from edge_runtime.keys import generate_key
from edge_runtime.manifest import read_manifest
from edge_runtime.readers.ct import TargetGrid, read_ct
from edge_runtime.readers.genomics import read_expression
from edge_runtime.readers.pathology import read_tiles
from edge_runtime.units import parse_duration_ms, parse_size_mb
from export.synth_files import write_dicom_series, write_nifti, write_png

GRID = TargetGrid((4, 8, 8), (4.0, 2.0, 2.0))
# derandomize: CI runs the same (seeded) examples every time; longer fuzzing runs can drop it.
SETTINGS = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _seed_files(folder: Path) -> dict[str, bytes]:
    vol = np.linspace(-1000, 500, 4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    write_dicom_series(vol, GRID.spacing_mm, folder / "dcm", "fz")
    write_nifti(vol, GRID.spacing_mm, folder / "v.nii.gz")
    write_png(np.zeros((8, 8, 3), np.uint8), folder / "t.png")
    first = sorted((folder / "dcm").iterdir())[0]
    return {
        "slice.dcm": first.read_bytes(),
        "v.nii.gz": (folder / "v.nii.gz").read_bytes(),
        "t.png": (folder / "t.png").read_bytes(),
    }


with tempfile.TemporaryDirectory() as _tmp:
    SEEDS = _seed_files(Path(_tmp))


def _mutate(data: bytes, cuts: list[tuple[int, int]], truncate: int | None) -> bytes:
    buf = bytearray(data)
    for pos, val in cuts:
        if buf:
            buf[pos % len(buf)] = val
    if truncate is not None and buf:
        del buf[truncate % len(buf):]
    return bytes(buf)


mutations = st.tuples(
    st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=12),
    st.one_of(st.none(), st.integers(0, 1 << 20)),
)


def _only_clean_errors(fn, *args):
    try:
        fn(*args)
    except BadInput:
        pass


@SETTINGS
@given(mutation=mutations)
def test_fuzz_dicom_slice(tmp_path_factory, mutation):
    folder = tmp_path_factory.mktemp("fz")
    (folder / "only.dcm").write_bytes(_mutate(SEEDS["slice.dcm"], *mutation))
    _only_clean_errors(read_ct, folder, GRID)
    _only_clean_errors(read_tiles, folder / "only.dcm")


@SETTINGS
@given(mutation=mutations)
def test_fuzz_nifti(tmp_path_factory, mutation):
    path = tmp_path_factory.mktemp("fz") / "v.nii.gz"
    path.write_bytes(_mutate(SEEDS["v.nii.gz"], *mutation))
    _only_clean_errors(read_ct, path, GRID)


@SETTINGS
@given(mutation=mutations)
def test_fuzz_png(tmp_path_factory, mutation):
    path = tmp_path_factory.mktemp("fz") / "t.png"
    path.write_bytes(_mutate(SEEDS["t.png"], *mutation))
    _only_clean_errors(read_tiles, path)


@SETTINGS
@given(text=st.text(alphabet=st.sampled_from(list("G123,.\t\n-eEnaNif \"x")), max_size=200))
def test_fuzz_expression_table(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fz") / "e.csv"
    path.write_text(text)
    _only_clean_errors(read_expression, path, ("G1", "G2", "G3"))


@SETTINGS
@given(text=st.text(max_size=300), suffix=st.sampled_from([".csv", ".jsonl", ".tsv"]))
def test_fuzz_manifest(tmp_path_factory, text, suffix):
    path = tmp_path_factory.mktemp("fz") / f"m{suffix}"
    path.write_text(text)
    _only_clean_errors(read_manifest, path)


@SETTINGS
@given(doc=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=12))
def test_fuzz_bundle_manifest(tmp_path_factory, doc):
    folder = tmp_path_factory.mktemp("fz")
    (folder / MANIFEST).write_text(json.dumps(doc))
    _only_clean_errors(load_bundle, folder, KEY.public_key())


KEY = generate_key()


@settings(max_examples=200, deadline=None, derandomize=True)
@given(text=st.text(max_size=20))
def test_fuzz_budget_strings(text):
    _only_clean_errors(parse_size_mb, text)
    _only_clean_errors(parse_duration_ms, text)


@SETTINGS
@given(doc=st.dictionaries(
    st.sampled_from(["format_version", "files", "preprocessing", "classes", "model_version", "x"]),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=12),
    max_size=6))
def test_fuzz_signed_but_malformed_bundle_manifest(tmp_path_factory, doc):
    """Even a manifest the trusted key signed must not crash the loader when its content is odd."""
    from edge_runtime.bundle import canonical_json, sign_manifest

    folder = tmp_path_factory.mktemp("fz")
    try:
        canonical_json(doc)
    except ValueError:
        return
    (folder / MANIFEST).write_text(json.dumps(sign_manifest(doc, KEY)))
    _only_clean_errors(load_bundle, folder, KEY.public_key())


# ------------------------------------------------------------------ sync protocol (what the server parses)

_KEY = generate_key()


@SETTINGS
@given(st.text(max_size=200))
def test_fuzz_enrollment_token(text):
    from edge_runtime.sync.protocol import parse_token

    try:
        clinic, secret, fpr, tier = parse_token(text)
    except BadInput:
        return
    assert clinic and len(secret) >= 20 and len(fpr) == 64 and tier in ("clinic", "hospital")


@SETTINGS
@given(st.dictionaries(st.sampled_from(["X-DWFL-Clinic", "X-DWFL-Timestamp", "X-DWFL-Nonce", "X-DWFL-Signature"]),
                       st.text(max_size=120)), st.binary(max_size=64))
def test_fuzz_request_signature_headers(headers, body):
    from edge_runtime.sync.protocol import AuthError, check_request

    try:
        check_request(headers, "POST", "/v1/updates", body, _KEY.public_key(), now=1.7e9)
    except AuthError:
        return
    raise AssertionError("a forged request was accepted")


@SETTINGS
@given(st.text(max_size=40), st.integers(-2, 2**40), st.sampled_from(["x25519", "mlkem768-x25519", "rsa"]),
       st.text(max_size=200), st.text(max_size=120))
def test_fuzz_update_envelope(update_id, round_id, kem, sealed, signature):
    from edge_runtime.sync.protocol import AuthError, Envelope

    env = Envelope(update_id, "north", round_id, 1, kem, sealed, signature)
    try:
        env.check(_KEY.public_key())
    except (AuthError, BadInput):
        return
    raise AssertionError("an unsigned envelope was accepted")


@settings(SETTINGS, max_examples=min(SETTINGS.max_examples, 30))
@given(st.binary(max_size=2000))
def test_fuzz_sealed_update(ciphertext):
    from edge_runtime.sync import update as codec
    from edge_runtime.sync.hpke import SealError

    private = _FUZZ_HPKE
    binding = {"clinic": "north", "round_id": 1, "base_version": 1, "update_id": "u-1", "kem": "x25519"}
    env = codec.seal(b"update", key=_KEY, hpke_public=private.public(), **binding)
    genuine = env.sealed_bytes()
    for data in (ciphertext, genuine[:-1] + bytes([genuine[-1] ^ 1]), genuine[: len(genuine) // 2]):
        try:
            codec.unseal(data, private, **binding)
        except SealError:
            continue
        raise AssertionError("a tampered or random ciphertext opened")
    with pytest.raises(SealError):  # bound to its update id: moved to another one, it does not open
        codec.unseal(genuine, private, **{**binding, "update_id": "u-2"})
    assert codec.open_envelope(env, private) == codec.unseal(genuine, private, **binding) == b"update"


_UPDATE_REFERENCE = {"classifier.weight": np.zeros((2, 8), np.float32), "classifier.bias": np.zeros(2, np.float32)}


@SETTINGS
@given(mutations)
def test_fuzz_update_bytes(mutation):
    """What the server does with an opened update: decode, then validate against the head."""
    from edge_runtime.sync import update as codec

    good = codec.encode(_UPDATE_REFERENCE, {"update_id": "u-1", "n": 50, "val_loss": 0.6})
    data = _mutate(good, *mutation)
    try:
        summary = codec.validate(codec.decode(data, codec.size_limit(_UPDATE_REFERENCE)), _UPDATE_REFERENCE, "u-1")
    except codec.UpdateError:
        return
    assert summary.n > 0 and np.isfinite(summary.norm)


def _hpke():
    from edge_runtime.sync.hpke import HpkePrivate

    return HpkePrivate.generate()


_FUZZ_HPKE = _hpke()
