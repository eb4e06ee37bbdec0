"""Readers on real files written here with pydicom, nibabel and Pillow, and on pydicom's own files."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from edge_runtime.errors import BadInput
from edge_runtime.readers.ct import TargetGrid, read_ct
from edge_runtime.readers.genomics import read_expression
from edge_runtime.readers.pathology import read_tiles
from export.synth_files import write_dicom_series, write_nifti

GRID = TargetGrid(grid=(8, 16, 16), spacing_mm=(4.0, 2.0, 2.0))


def _phantom(d=8, h=16, w=16, seed=0):
    """A volume whose every slice differs, so ordering mistakes show."""
    rng = np.random.default_rng(seed)
    vol = np.full((d, h, w), -1000.0, np.float32)
    vol[:, 3:13, 3:13] = 40.0 + rng.normal(0, 5, (d, 10, 10))
    vol += (np.arange(d) * 25.0)[:, None, None]
    return vol.round()


def test_dicom_series_roundtrip_in_shuffled_file_order(tmp_path):
    vol = _phantom()
    write_dicom_series(vol, GRID.spacing_mm, tmp_path / "s", "c1")
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    positions = [float(pydicom.dcmread(tmp_path / "s" / n).ImagePositionPatient[2]) for n in names]
    assert positions != sorted(positions), "file names are not in slice order"
    assert np.allclose(read_ct(tmp_path / "s", GRID), vol, atol=0.5)


def test_dicom_rescale_slope_and_intercept_applied(tmp_path):
    vol = _phantom()
    write_dicom_series(vol, GRID.spacing_mm, tmp_path / "s", "c1")
    for f in (tmp_path / "s").iterdir():  # re-store every slice with slope 2, intercept -2048
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        ds.PixelData = np.round((hu + 2048) / 2).astype(np.uint16).tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = 2, -2048
        ds.save_as(f)
    assert np.allclose(read_ct(tmp_path / "s", GRID), vol, atol=1.01)


def _restore_slice(path, **tags):
    ds = pydicom.dcmread(path)
    for keyword, value in tags.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")  # the test writes them on purpose
@pytest.mark.parametrize("slope,intercept", [(0, -1024), ("inf", -1024), (1, "nan")])
def test_dicom_unusable_rescale_refused_with_the_file(tmp_path, slope, intercept):
    # Regression (issue 14 item 6): slope 0 was read as 1 (`float(... or 1)`) and the volume accepted.
    write_dicom_series(_phantom(), GRID.spacing_mm, tmp_path / "s", "c1")
    victim = sorted((tmp_path / "s").iterdir())[3]
    _restore_slice(victim, RescaleSlope=slope, RescaleIntercept=intercept)
    with pytest.raises(BadInput, match=f"{victim.name}: DICOM rescale slope/intercept .* unusable"):
        read_ct(tmp_path / "s", GRID)


def test_dicom_overflowing_slope_refused_without_a_warning(tmp_path):
    write_dicom_series(_phantom(), GRID.spacing_mm, tmp_path / "s", "c1")
    for f in (tmp_path / "s").iterdir():
        _restore_slice(f, RescaleSlope="1e38")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BadInput, match="s: CT volume has NaN or infinite values"):
            read_ct(tmp_path / "s", GRID)


def test_dicom_missing_rescale_tags_mean_slope_1_intercept_0(tmp_path):
    vol = _phantom()
    write_dicom_series(vol, GRID.spacing_mm, tmp_path / "s", "c1")
    for f in (tmp_path / "s").iterdir():  # bake the intercept into the stored values, then drop both tags
        ds = pydicom.dcmread(f)
        ds.PixelRepresentation = 1
        ds.PixelData = (ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept)).astype(np.int16).tobytes()
        ds.save_as(f)
        _restore_slice(f, RescaleSlope=None, RescaleIntercept=None)
    assert np.allclose(read_ct(tmp_path / "s", GRID), vol, atol=0.5)


def test_dicom_spacing_from_tags_resamples(tmp_path):
    vol = _phantom(d=16, h=32, w=32)
    write_dicom_series(vol, (2.0, 1.0, 1.0), tmp_path / "s", "c1")  # twice as fine as the grid
    out = read_ct(tmp_path / "s", GRID)
    assert out.shape == GRID.grid
    assert abs(out[4, 8, 8] - vol[8:10, 16:18, 16:18].mean()) < 30  # same anatomy, coarser voxels


def test_nifti_roundtrip(tmp_path):
    vol = _phantom()
    write_nifti(vol, GRID.spacing_mm, tmp_path / "v.nii.gz")
    assert np.allclose(read_ct(tmp_path / "v.nii.gz", GRID), vol, atol=1e-3)
    write_nifti(vol, GRID.spacing_mm, tmp_path / "v.nii")
    assert np.allclose(read_ct(tmp_path / "v.nii", GRID), vol, atol=1e-3)


def test_multiframe_enhanced_ct(tmp_path):
    vol = _phantom()
    d, h, w = vol.shape
    order = np.random.default_rng(1).permutation(d)  # frames stored out of order
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.NumberOfFrames = "CT", generate_uid(), d
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = h, w, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = [2.0, 2.0]
    shared.PixelValueTransformationSequence = Sequence([Dataset()])
    shared.PixelValueTransformationSequence[0].RescaleSlope = 1
    shared.PixelValueTransformationSequence[0].RescaleIntercept = -100
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in order:
        f = Dataset()
        f.PlanePositionSequence = Sequence([Dataset()])
        f.PlanePositionSequence[0].ImagePositionPatient = [0, 0, float(k) * 4.0]
        frames.append(f)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = (vol[order] + 100).astype(np.int16).tobytes()
    ds.save_as(tmp_path / "mf.dcm", enforce_file_format=True)
    assert np.allclose(read_ct(tmp_path / "mf.dcm", GRID), vol, atol=1e-3)


def test_pydicom_shipped_files():
    # CT_small is a real single CT slice: readable, but one slice is not a volume.
    with pytest.raises(BadInput, match="1 slices"):
        read_ct(Path(get_testdata_file("CT_small.dcm")), GRID)
    with pytest.raises(BadInput, match="modality is MR, not CT"):
        read_ct(Path(get_testdata_file("MR_small.dcm")), GRID)


def test_series_built_from_pydicom_ct_small(tmp_path):
    """Eight copies of pydicom's CT slice at different positions form a readable volume whose HU
    values are the file's own stored values rescaled."""
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    expected = src.pixel_array * float(src.RescaleSlope) + float(src.RescaleIntercept)
    spacing = [float(v) for v in src.PixelSpacing]
    series = tmp_path / "s"
    series.mkdir()
    for k in range(8):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        pos = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [pos[0], pos[1], pos[2] + 5.0 * k]
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(series / f"{7 - k}.dcm")
    target = TargetGrid(grid=(8, *expected.shape), spacing_mm=(5.0, *spacing))
    vol = read_ct(series, target)
    assert np.allclose(vol[3], expected, atol=1e-2)


@pytest.mark.parametrize(
    "damage,needle",
    [
        ("mixed", "mixes 2 DICOM series"),
        ("truncated_header", "not a readable DICOM|modality is missing"),
        ("truncated_pixels", "cannot decode DICOM pixel data"),
        ("garbage", "not a readable DICOM"),
        ("empty", "is empty"),
        ("constant", "empty or constant"),
        ("few", "at least 4"),
        ("duplicate", "same position"),
    ],
)
def test_bad_series_refused(tmp_path, damage, needle):
    vol = _phantom()
    s = tmp_path / "s"
    if damage == "constant":
        vol[:] = -1000.0
    if damage == "few":
        vol = vol[:3]
    write_dicom_series(vol, GRID.spacing_mm, s, "c1")
    files = sorted(s.iterdir())
    if damage == "mixed":
        ds = pydicom.dcmread(files[0])
        ds.SeriesInstanceUID = generate_uid()
        ds.save_as(files[0])
    elif damage == "truncated_header":
        files[0].write_bytes(files[0].read_bytes()[:200])
    elif damage == "truncated_pixels":
        files[0].write_bytes(files[0].read_bytes()[:-100])
    elif damage == "garbage":
        files[0].write_bytes(b"this is not dicom at all" * 10)
    elif damage == "empty":
        shutil.rmtree(s)
        s.mkdir()
    elif damage == "duplicate":
        shutil.copy(files[0], s / "copy.dcm")
        ds = pydicom.dcmread(s / "copy.dcm")
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(s / "copy.dcm")
    with pytest.raises(BadInput, match=needle):
        read_ct(s, GRID)


def test_bad_nifti_refused(tmp_path):
    import nibabel as nib

    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(BadInput, match="bad.nii.gz: not a readable NIfTI"):
        read_ct(tmp_path / "bad.nii.gz", GRID)
    nan = np.full((16, 16, 8), np.nan, np.float32)
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(tmp_path / "nan.nii"))
    with pytest.raises(BadInput, match="NaN"):
        read_ct(tmp_path / "nan.nii", GRID)
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), str(tmp_path / "flat.nii"))
    with pytest.raises(BadInput, match="2 dimensions"):
        read_ct(tmp_path / "flat.nii", GRID)
    with pytest.raises(BadInput, match="does not exist"):
        read_ct(tmp_path / "missing.nii", GRID)


# ---------------------------------------------------------------- pathology


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("TIFF", ".tif"), ("JPEG", ".jpg")])
def test_tile_formats(tmp_path, fmt, suffix):
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(tile).save(tmp_path / f"t{suffix}", format=fmt)
    (got,) = read_tiles(tmp_path / f"t{suffix}")
    assert got.shape == (40, 30, 3) and got.dtype == np.uint8
    if fmt != "JPEG":
        assert np.array_equal(got, tile)


def test_tile_folder_and_grey_and_rgba(tmp_path):
    Image.fromarray(np.full((8, 8), 100, np.uint8), mode="L").save(tmp_path / "a.png")
    Image.fromarray(np.full((8, 8, 4), 50, np.uint8), mode="RGBA").save(tmp_path / "b.png")
    (tmp_path / "notes.txt").write_text("ignored")
    tiles = read_tiles(tmp_path)
    assert len(tiles) == 2 and all(t.shape == (8, 8, 3) for t in tiles)


def _png_rgb16(path, rgb):
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one), chunks by hand."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_16bit_grey_tile_refused_not_saturated(tmp_path, suffix):
    # Regression (issue 14 item 7): Pillow's I;16 -> RGB clipped every value above 255 to white and
    # the tile was used; a 16-bit grey image is a fluorescence channel or a raw export, refused.
    grey = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(grey).save(tmp_path / f"f{suffix}")
    with pytest.raises(BadInput, match=f"f{suffix}: single-channel 16-bit image .* 8-bit RGB"):
        read_tiles(tmp_path / f"f{suffix}")
    Image.fromarray(grey.astype(np.float32)).save(tmp_path / "f32.tif")
    with pytest.raises(BadInput, match="f32.tif: single-channel 32-bit float image"):
        read_tiles(tmp_path / "f32.tif")


def _tiff_rgb16(path, rgb):
    """A 16-bit-per-channel RGB TIFF, uncompressed, one strip (Pillow cannot write one)."""
    import struct

    h, w, _ = rgb.shape
    data = rgb.astype("<u2").tobytes()
    n, ifd = 10, 8
    bps = ifd + 2 + 12 * n + 4  # BitsPerSample's three values, then the pixels
    pixels = bps + 6
    tags = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, bps), (259, 3, 1, 1), (262, 3, 1, 2), (273, 4, 1, pixels),
            (277, 3, 1, 3), (278, 3, 1, h), (279, 4, 1, len(data)), (284, 3, 1, 1)]
    out = b"II*\x00" + struct.pack("<IH", ifd, n)
    for tag, kind, count, value in tags:
        inline = kind == 3 and count == 1
        out += struct.pack("<HHIHH", tag, kind, count, value, 0) if inline else struct.pack("<HHII", tag, kind, count, value)
    path.write_bytes(out + struct.pack("<I", 0) + struct.pack("<HHH", 16, 16, 16) + data)


@pytest.mark.parametrize("writer,name", [(_png_rgb16, "t.png"), (_tiff_rgb16, "t.tif")])
def test_16bit_rgb_tile_mapped_by_its_full_range(tmp_path, writer, name):
    rgb = np.zeros((8, 8, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 65535, 32768, 257
    writer(tmp_path / name, rgb)
    (tile,) = read_tiles(tmp_path / name)
    assert tile.dtype == np.uint8 and tuple(tile[0, 0]) == (255, 128, 1)  # value * 255 / 65535


def test_dicom_tile_scaled_by_bits_stored(tmp_path):
    # 12-bit RGB in 16-bit words: scaled by 4095, not by the word's 65535 (which made it near black)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "OT", 4, 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    pixels = np.zeros((4, 4, 3), np.uint16)
    pixels[..., 0], pixels[..., 1] = 4095, 2048
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "t.dcm", enforce_file_format=True)
    (tile,) = read_tiles(tmp_path / "t.dcm")
    assert tuple(tile[0, 0]) == (255, 128, 0)


def test_dicom_secondary_capture_tiles():
    (tile,) = read_tiles(Path(get_testdata_file("SC_rgb_jpeg.dcm")))
    assert tile.shape == (256, 256, 3)
    assert len(read_tiles(Path(get_testdata_file("SC_rgb_rle_2frame.dcm")))) == 2
    with pytest.raises(BadInput, match="not a pathology image"):
        read_tiles(Path(get_testdata_file("CT_small.dcm")))


def test_bad_tiles_refused(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    with pytest.raises(BadInput, match="x.png: not a readable image"):
        read_tiles(tmp_path / "x.png")
    with pytest.raises(BadInput, match="does not exist"):
        read_tiles(tmp_path / "missing.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no tile images"):
        read_tiles(tmp_path / "empty")


# ---------------------------------------------------------------- genomics

GENES = ("G1", "G2", "G3", "G4")


def test_long_and_wide_tables(tmp_path):
    (tmp_path / "long.csv").write_text("gene_id,value\nG2,2.5\nG1,1\nOTHER,7\nG4,\n")
    got = read_expression(tmp_path / "long.csv", GENES)
    assert got[0] == 1 and got[1] == 2.5 and np.isnan(got[2]) and np.isnan(got[3])
    (tmp_path / "wide.tsv").write_text("case_id\tG1\tG3\tG4\nc7\t0.5\t3\tNaN\n")
    got = read_expression(tmp_path / "wide.tsv", GENES)
    assert got[0] == 0.5 and np.isnan(got[1]) and got[2] == 3 and np.isnan(got[3])


@pytest.mark.parametrize(
    "text,needle",
    [
        ("gene_id,value\nG1,abc\nG2,1\n", "not a number"),
        ("gene_id,value\nG1,-1\nG2,1\n", "non-negative"),
        ("gene_id,value\nG1,inf\nG2,1\n", "finite"),
        ("gene_id,value\nG1,1e308\nG2,1\n", r"e.csv: line 2: value '1e308' for gene 'G1' is too large"),
        ("G1,G2\n1,3.5e38\n", r"e.csv: column 'G2': value '3.5e38' .* too large"),
        ("gene_id,value\nG1,1\nG1,2\n", "appears twice"),
        ("gene_id,value\nX,1\nY,2\n", "all genes missing"),
        ("gene_id,value\n", "at least one row"),
        ("G1,G2\n1,2\n3,4\n5,6\n", "all genes missing"),
        ("a,b,c\n1,2,3\n4,5,6\n", "neither long"),
    ],
)
def test_bad_tables_refused(tmp_path, text, needle):
    # warnings are errors: 1e308 used to print numpy's cast-overflow RuntimeWarning (issue 14 item 10b)
    (tmp_path / "e.csv").write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BadInput, match=needle):
            read_expression(tmp_path / "e.csv", GENES)


def test_binary_expression_file_refused(tmp_path):
    (tmp_path / "e.csv").write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(BadInput, match="binary"):
        read_expression(tmp_path / "e.csv", GENES)
