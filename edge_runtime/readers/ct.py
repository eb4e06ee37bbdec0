"""CT volumes from a DICOM series folder, a multi-frame DICOM file, or NIfTI (.nii, .nii.gz).

DICOM series are read in two passes: headers only (to check the series and order the slices by
their position along the slice normal, never by file name), then pixel data one slice at a time in
that order, each slice converted to HU and resampled in-plane to the bundle grid at once. Memory
stays at one full-resolution slice plus the small resampled stack, whatever the series size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BadInput
from ..harmonize import InPlaneResampler, resample_slices
from . import check_within

MIN_SLICES = 4
MIN_HU_RANGE = 1.0  # a volume whose values all lie within 1 HU is empty or blank
CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
}


@dataclass(frozen=True)
class TargetGrid:
    grid: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]


def read_ct(path: Path, target: TargetGrid, *, within: Path | None = None) -> np.ndarray:
    """HU volume of ``path`` resampled to ``target`` (D, H, W), float32. Refuses with BadInput.

    ``within``: every file read must really (links followed) lie inside it (the manifest's folder).
    """
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: CT file or folder does not exist")
    check_within(path, within)
    name = path.name.lower()
    with np.errstate(over="ignore", invalid="ignore"):  # a huge slope overflows to inf: refused just below, not warned about
        if path.is_dir():
            volume = read_dicom_series(path, target, within=within)
        elif name.endswith((".nii", ".nii.gz")):
            volume = read_nifti(path, target)
        else:
            volume = read_dicom_series([path], target, where=path)
    _check_not_blank(volume, path)
    return volume


def _check_not_blank(volume: np.ndarray, where: Path) -> None:
    if not np.all(np.isfinite(volume)):
        raise BadInput(f"{where}: CT volume has NaN or infinite values")
    if float(volume.max() - volume.min()) < MIN_HU_RANGE:
        raise BadInput(f"{where}: CT volume is empty or constant ({float(volume.min()):.0f} HU everywhere)")


# ---------------------------------------------------------------- DICOM


def _pydicom():
    import pydicom  # local: the clinic pays for it only when it reads DICOM

    return pydicom


def _read_header(path: Path):
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types (incl. NotImplementedError) on damaged files
        raise BadInput(f"{path}: not a readable DICOM file ({type(exc).__name__})") from exc


def _get(ds, keyword: str, where: Path, default=None):
    """A tag's value; pydicom decodes elements lazily, so a damaged one fails only when read."""
    try:
        return getattr(ds, keyword, default)
    except Exception as exc:
        raise BadInput(f"{where}: DICOM tag {keyword} is unreadable ({type(exc).__name__})") from exc


def _int(ds, keyword: str, where: Path, default: int | None = None) -> int:
    value = _get(ds, keyword, where)
    if value is None or value == "":
        if default is None:
            raise BadInput(f"{where}: DICOM tag {keyword} is missing")
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise BadInput(f"{where}: DICOM tag {keyword} is not an integer") from exc


def _floats(ds, keyword: str, n: int, where: Path) -> np.ndarray:
    value = _get(ds, keyword, where)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise BadInput(f"{where}: DICOM tag {keyword} is missing or not numeric") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise BadInput(f"{where}: DICOM tag {keyword} must hold {n} finite numbers")
    return arr


def _check_ct(ds, where: Path) -> None:
    modality = str(_get(ds, "Modality", where, "") or "")
    if modality != "CT":
        raise BadInput(f"{where}: DICOM modality is {modality or 'missing'}, not CT")
    sop_class = str(_get(ds, "SOPClassUID", where, ""))
    if sop_class not in CT_SOP_CLASSES:
        raise BadInput(f"{where}: DICOM SOP class {sop_class or 'missing'} is not a CT image")
    if _int(ds, "SamplesPerPixel", where, default=1) != 1:
        raise BadInput(f"{where}: CT image must be single-channel")


def _rescale(ds, where: Path) -> tuple[float, float]:
    """RescaleSlope / RescaleIntercept (stored value -> HU); absent (or empty) tags mean 1 and 0.

    A slope of 0 is refused, not taken for "absent": it would turn every voxel into the intercept.
    """
    slope = _rescale_value(ds, "RescaleSlope", 1.0, where)
    intercept = _rescale_value(ds, "RescaleIntercept", 0.0, where)
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
        raise BadInput(f"{where}: DICOM rescale slope/intercept {slope}/{intercept} are unusable (both must be finite, the slope non-zero)")
    return slope, intercept


def _rescale_value(ds, keyword: str, absent: float, where: Path) -> float:
    value = _get(ds, keyword, where)
    if value is None or (isinstance(value, str) and not value.strip()):
        return absent  # only a missing or empty tag takes the default; 0 is a value
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise BadInput(f"{where}: DICOM tag {keyword} is not numeric") from exc


@dataclass(frozen=True)
class _SliceHeader:
    """What the first pass keeps of each file: a few numbers, not the pydicom dataset (a long
    series would otherwise hold thousands of parsed headers)."""

    path: Path
    series: str
    frames: int
    rows: int = 0
    cols: int = 0
    orientation: tuple[float, ...] = ()
    position: tuple[float, ...] = ()
    spacing: tuple[float, float] = (0.0, 0.0)


def _slice_header(path: Path) -> _SliceHeader:
    ds = _read_header(path)
    _check_ct(ds, path)
    series = str(_get(ds, "SeriesInstanceUID", path, ""))
    frames = _int(ds, "NumberOfFrames", path, default=1)
    if frames > 1:  # multi-frame: geometry lives in the functional groups, read later
        return _SliceHeader(path, series, frames)
    return _SliceHeader(
        path, series, frames,
        rows=_int(ds, "Rows", path), cols=_int(ds, "Columns", path),
        orientation=tuple(_floats(ds, "ImageOrientationPatient", 6, path)),
        position=tuple(_floats(ds, "ImagePositionPatient", 3, path)),
        spacing=tuple(_floats(ds, "PixelSpacing", 2, path)),  # (row spacing, column spacing) = (y, x)
    )


def read_dicom_series(
    source: Path | list[Path], target: TargetGrid, where: Path | None = None, *, within: Path | None = None
) -> np.ndarray:
    """A folder of single-frame slices (any file names, any order) or one multi-frame file."""
    if isinstance(source, Path):
        entries = sorted(Path(source).rglob("*"))
        for p in entries:  # rglob's is_file() follows a file link wherever it points; a linked folder
            if p.is_symlink() or p.is_file():  # is not walked, but one that leaves is refused all the same
                check_within(p, within)
        files = [p for p in entries if p.is_file() and not p.name.startswith(".")]
    else:
        files = source
    where = where or Path(source)
    if not files:
        raise BadInput(f"{where}: DICOM series folder is empty")
    headers = [_slice_header(p) for p in files]
    if len({h.series for h in headers}) != 1:
        raise BadInput(f"{where}: folder mixes {len({h.series for h in headers})} DICOM series; give one series per case")
    if len(headers) == 1 and headers[0].frames > 1:
        return _read_multiframe(headers[0].path, _read_header(headers[0].path), target)
    if any(h.frames > 1 for h in headers):
        raise BadInput(f"{where}: folder mixes multi-frame and single-frame files")
    return _read_single_frames(headers, target, where)


def _normal(orientation: np.ndarray) -> np.ndarray:
    normal = np.cross(orientation[:3], orientation[3:])
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise BadInput("DICOM ImageOrientationPatient has parallel row and column directions")
    return normal / norm


def _read_single_frames(headers: list[_SliceHeader], target: TargetGrid, where: Path) -> np.ndarray:
    first = headers[0]
    orientation = np.asarray(first.orientation)
    normal = _normal(orientation)
    for h in headers:
        if not np.allclose(h.orientation, orientation, atol=1e-3):
            raise BadInput(f"{h.path}: slice orientation differs from the rest of the series")
        if (h.rows, h.cols) != (first.rows, first.cols):
            raise BadInput(f"{h.path}: slice size {h.cols}x{h.rows} differs from the rest of the series ({first.cols}x{first.rows})")
    if len(headers) < MIN_SLICES:
        raise BadInput(f"{where}: CT series has {len(headers)} slices, at least {MIN_SLICES} are needed")
    ordered = sorted(headers, key=lambda h: float(np.dot(h.position, normal)))
    positions = np.array([float(np.dot(h.position, normal)) for h in ordered])
    if np.any(np.diff(positions) < 1e-3):
        raise BadInput(f"{where}: CT series has two slices at the same position")
    plane = InPlaneResampler((first.rows, first.cols), first.spacing, target.grid[1:], target.spacing_mm[1:])
    stack = np.empty((len(ordered), *target.grid[1:]), np.float32)
    pydicom = _pydicom()
    for i, h in enumerate(ordered):
        try:
            ds = pydicom.dcmread(h.path)
            pixels = ds.pixel_array
        except Exception as exc:  # pydicom raises many types for damaged pixel data
            raise BadInput(f"{h.path}: cannot decode DICOM pixel data ({type(exc).__name__})") from exc
        if pixels.shape != (first.rows, first.cols):
            raise BadInput(f"{h.path}: pixel data shape {pixels.shape} does not match Rows/Columns")
        slope, intercept = _rescale(ds, h.path)
        stack[i] = plane(pixels.astype(np.float32) * slope + intercept)
        del ds, pixels
    return resample_slices(stack, positions, target.grid[0], target.spacing_mm[0])


def _read_multiframe(path: Path, header, target: TargetGrid) -> np.ndarray:
    """Enhanced (multi-frame) CT: geometry and rescale from the functional groups."""
    shared = (_get(header, "SharedFunctionalGroupsSequence", path) or [None])[0]
    frames = _get(header, "PerFrameFunctionalGroupsSequence", path)
    n = _int(header, "NumberOfFrames", path)
    if shared is None or frames is None or len(frames) != n:
        raise BadInput(f"{path}: multi-frame CT lacks its functional groups (geometry per frame)")
    try:
        orientation = _floats(shared.PlaneOrientationSequence[0], "ImageOrientationPatient", 6, path)
        spacing = _floats(shared.PixelMeasuresSequence[0], "PixelSpacing", 2, path)
        normal = _normal(orientation)
        positions = np.array([float(_floats(f.PlanePositionSequence[0], "ImagePositionPatient", 3, path) @ normal) for f in frames])
    except (AttributeError, IndexError) as exc:
        raise BadInput(f"{path}: multi-frame CT geometry is incomplete ({exc})") from exc
    if n < MIN_SLICES:
        raise BadInput(f"{path}: CT series has {n} frames, at least {MIN_SLICES} are needed")
    try:
        pixels = _pydicom().dcmread(path).pixel_array
    except Exception as exc:
        raise BadInput(f"{path}: cannot decode DICOM pixel data ({type(exc).__name__})") from exc
    transform = _get(shared, "PixelValueTransformationSequence", path)
    slope, intercept = _rescale(transform[0] if transform else header, path)
    if pixels.shape != (n, *pixels.shape[1:]) or pixels.ndim != 3:
        raise BadInput(f"{path}: pixel data shape {pixels.shape} does not match {n} frames")
    order = np.argsort(positions)
    if np.any(np.diff(positions[order]) < 1e-3):
        raise BadInput(f"{path}: CT frames share a position")
    plane = InPlaneResampler(pixels.shape[1:], tuple(spacing), target.grid[1:], target.spacing_mm[1:])
    stack = np.stack([plane(pixels[i].astype(np.float32) * slope + intercept) for i in order])
    return resample_slices(stack, positions[order], target.grid[0], target.spacing_mm[0])


# ---------------------------------------------------------------- NIfTI


def read_nifti(path: Path, target: TargetGrid) -> np.ndarray:
    """NIfTI volume in HU (scl_slope/inter applied by nibabel), reoriented to RAS, axes to (z, y, x)."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        img = nib.as_closest_canonical(img)
        zooms = img.header.get_zooms()[:3]
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types on damaged files
        raise BadInput(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {str(exc)[:80]})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise BadInput(f"{path}: NIfTI image has {data.ndim} dimensions, a CT volume needs 3")
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise BadInput(f"{path}: NIfTI data type {data.dtype} is not a real number type")
    if data.shape[2] < MIN_SLICES:
        raise BadInput(f"{path}: CT volume has {data.shape[2]} slices, at least {MIN_SLICES} are needed")
    spacing_xyz = np.asarray(zooms, dtype=np.float64)
    if not np.all(np.isfinite(spacing_xyz)) or np.any(spacing_xyz <= 0):
        raise BadInput(f"{path}: NIfTI voxel sizes {tuple(spacing_xyz)} are not positive")
    if not np.all(np.isfinite(data)):
        raise BadInput(f"{path}: CT volume has NaN or infinite values")
    # RAS (x, y, z) -> (z, y, x); y flipped so rows run anterior -> posterior like DICOM.
    zyx = np.transpose(data, (2, 1, 0))[:, ::-1, :]
    plane = InPlaneResampler(zyx.shape[1:], (spacing_xyz[1], spacing_xyz[0]), target.grid[1:], target.spacing_mm[1:])
    stack = np.stack([plane(np.asarray(s, dtype=np.float32)) for s in zyx])
    positions = np.arange(zyx.shape[0]) * spacing_xyz[2]
    return resample_slices(stack, positions, target.grid[0], target.spacing_mm[0])
