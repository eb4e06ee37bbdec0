"""Pathology tiles: PNG / JPEG / TIFF through Pillow, DICOM secondary capture or VL whole-slide tiles
through pydicom. Always returns RGB uint8 (H, W, 3).

Bit depth: the model reads 8-bit RGB brightfield tiles. A 16-bit-per-channel RGB file (48-bit TIFF
or PNG export of a brightfield scan) is mapped by its full 16-bit range, value * 255 / 65535 (Pillow
keeps the top 8 bits). A single-channel image deeper than 8 bits (16-bit or 32-bit integer, float)
is refused: in a pathology lab that is a fluorescence channel or a raw scanner export, not an H&E
tile, and every choice of display range for it (full 16 bits, the file's maximum, a percentile)
would feed the model a picture it was never trained on; Pillow's own conversion clips everything
above 255 to white. DICOM tiles deeper than 8 bits are scaled by their BitsStored maximum.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BadInput
from . import check_within

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
MAX_PIXELS = 64_000_000  # a tile, not a whole slide: refuse decompression bombs
# Pillow modes of single-channel images deeper than 8 bits (I;16* = 16-bit, I = 32-bit int, F = float)
DEEP_GREY_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
PATHOLOGY_MODALITIES = {"SM", "OT", "XC", "GM"}  # slide microscopy, other, external camera, general microscopy


def read_tiles(path: Path, *, within: Path | None = None) -> list[np.ndarray]:
    """One tile file, or every tile file in a folder (sorted by name). ``within``: every file read
    must really (links followed) lie inside it (the manifest's folder)."""
    path = Path(path)
    if path.is_dir():
        check_within(path, within)
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES + DICOM_SUFFIXES)
        if not files:
            raise BadInput(f"{path}: folder has no tile images ({', '.join(IMAGE_SUFFIXES + DICOM_SUFFIXES)})")
        for f in files:  # all checked before any is decoded: a case is rejected whole
            check_within(f, within)
        return [tile for f in files for tile in read_tile_file(f)]
    if path.exists():
        check_within(path, within)
    return read_tile_file(path)


def read_tile_file(path: Path) -> list[np.ndarray]:
    if not path.exists():
        raise BadInput(f"{path}: tile file does not exist")
    if path.suffix.lower() in DICOM_SUFFIXES:
        return _read_dicom_tiles(path)
    return [_read_image(path)]


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise BadInput(f"{path}: image is {img.width}x{img.height}, too large for a tile")
            if img.mode in DEEP_GREY_MODES:
                raise BadInput(
                    f"{path}: single-channel {_depth(img.mode)} image (likely a fluorescence channel or a raw scanner "
                    "export); pathology tiles must be 8-bit RGB brightfield images: export the tile as 8-bit RGB"
                )
            img.load()
            rgb = img.convert("RGB")
    except BadInput:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadInput(f"{path}: not a readable image ({type(exc).__name__})") from exc
    arr = np.asarray(rgb, dtype=np.uint8)
    if arr.size == 0:
        raise BadInput(f"{path}: image is empty")
    return arr


def _depth(mode: str) -> str:
    return {"I": "32-bit integer", "F": "32-bit float"}.get(mode, "16-bit")


def _read_dicom_tiles(path: Path) -> list[np.ndarray]:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        modality = str(getattr(ds, "Modality", "") or "")
        samples = str(getattr(ds, "SamplesPerPixel", ""))
    except Exception as exc:  # pydicom raises many types, some only when a tag is first read
        raise BadInput(f"{path}: not a readable DICOM file ({type(exc).__name__})") from exc
    if modality not in PATHOLOGY_MODALITIES:
        raise BadInput(f"{path}: DICOM modality is {modality or 'missing'}, not a pathology image (SM/OT)")
    if samples != "3":
        raise BadInput(f"{path}: pathology tile must be a colour (3-sample) image")
    try:
        pixels = ds.pixel_array  # pydicom 3 converts YCbCr to RGB itself (as_rgb)
    except Exception as exc:
        raise BadInput(f"{path}: cannot decode DICOM pixel data ({type(exc).__name__})") from exc
    if pixels.dtype != np.uint8:
        if not np.issubdtype(pixels.dtype, np.integer):
            raise BadInput(f"{path}: pathology pixels are {pixels.dtype}, expected integers")
        pixels = (pixels.astype(np.float64) / _stored_max(ds, pixels.dtype) * 255).round().clip(0, 255)
    if pixels.ndim not in (3, 4) or pixels.shape[-1] != 3:
        raise BadInput(f"{path}: pathology pixel data has shape {pixels.shape}, expected RGB frames")
    frames = pixels if pixels.ndim == 4 else pixels[None]
    return [np.ascontiguousarray(f, dtype=np.uint8) for f in frames]


def _stored_max(ds, dtype: np.dtype) -> int:
    """Largest value the tile's BitsStored allows (12-bit data in 16-bit words is common); the word's
    maximum when the tag is missing or does not fit the word."""
    container = np.iinfo(dtype).bits
    try:
        bits = int(getattr(ds, "BitsStored", container) or container)
    except (TypeError, ValueError):
        bits = container
    return 2 ** (bits if 1 <= bits <= container else container) - 1
