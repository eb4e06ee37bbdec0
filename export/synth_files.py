"""Writes synthetic cases as the files a clinic has: a DICOM CT series (or NIfTI), PNG tiles, a CSV
expression table, and a manifest. numpy, pydicom, nibabel and Pillow only (no torch), so tests and
demos exercise the very readers the clinic uses."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from edge_runtime.fsutil import write_atomic
from edge_runtime.synthetic import Case, SyntheticCohort, gene_names

HU_INTERCEPT = -1024.0  # stored = HU + 1024, unsigned 16-bit, as most scanners write it
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def write_dicom_series(volume: np.ndarray, spacing: tuple[float, float, float], folder: Path, case_id: str, seed: int = 0) -> None:
    """One file per slice, named in an order unrelated to slice position (like many PACS exports)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    d, h, w = volume.shape
    uid = lambda *parts: generate_uid(entropy_srcs=[str(seed), case_id, *map(str, parts)])  # noqa: E731
    study, series, frame = uid("study"), uid("series"), uid("frame")
    names = np.random.default_rng([seed, d, h]).permutation(d)
    stored = np.clip(np.round(volume - HU_INTERCEPT), 0, 4095).astype(np.uint16)
    for k in range(d):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = uid("slice", k)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.PatientID, ds.PatientName = case_id, f"SYNTHETIC^{case_id}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-(w - 1) * spacing[2] / 2, -(h - 1) * spacing[1] / 2, k * spacing[0]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.Rows, ds.Columns = h, w
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, HU_INTERCEPT, "HU"
        ds.PixelData = stored[k].tobytes()
        ds.save_as(folder / f"IM{names[k]:05d}.dcm", enforce_file_format=True)


def write_nifti(volume: np.ndarray, spacing: tuple[float, float, float], path: Path) -> None:
    """(z, y, x) HU volume -> RAS NIfTI with the voxel sizes in the affine."""
    import nibabel as nib

    data = np.ascontiguousarray(volume[:, ::-1, :].transpose(2, 1, 0))
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))


def write_png(tile: np.ndarray, path: Path) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


def write_expression(values: np.ndarray, genes: list[str], path: Path) -> None:
    """Long layout: ``gene_id,value`` per row."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["gene_id", "value"])
    writer.writerows((g, f"{v:.6g}") for g, v in zip(genes, values))
    write_atomic(path, buf.getvalue().encode())


def write_case(case: Case, out: Path, genes: list[str], ct_format: str = "dicom", seed: int = 0) -> dict[str, str]:
    """Write the modalities ``case`` has; return its manifest row (paths relative to ``out``)."""
    row = {"case_id": case.case_id, "ct": "", "pathology": "", "genomics": "", "label": "", "site": str(case.site)}
    if case.ct is not None:
        if ct_format == "nifti":
            row["ct"] = f"ct/{case.case_id}.nii.gz"
            (out / "ct").mkdir(parents=True, exist_ok=True)
            write_nifti(case.ct, case.ct_spacing, out / row["ct"])
        else:
            row["ct"] = f"ct/{case.case_id}"
            write_dicom_series(case.ct, case.ct_spacing, out / row["ct"], case.case_id, seed)
    if case.tiles:
        (out / "pathology").mkdir(parents=True, exist_ok=True)
        names = [f"pathology/{case.case_id}_{i}.png" for i in range(len(case.tiles))]
        for name, tile in zip(names, case.tiles):
            write_png(tile, out / name)
        row["pathology"] = ";".join(names)
    if case.genomics is not None:
        (out / "genomics").mkdir(parents=True, exist_ok=True)
        row["genomics"] = f"genomics/{case.case_id}.csv"
        write_expression(case.genomics, genes, out / row["genomics"])
    return row


def write_cohort(cohort: SyntheticCohort, out: Path, start: int, count: int, classes: list[str], ct_format: str = "dicom",
                 site: int | None = None) -> Path:
    """Write ``count`` cases from index ``start`` (all from ``site`` when given) and ``manifest.csv``
    (written last, atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    genes = gene_names(cohort.config.spec.n_genes)
    rows = []
    for case in cohort.iter_cases(start, count, site):
        row = write_case(case, out, genes, ct_format, cohort.config.seed)
        row["label"] = classes[case.label]
        rows.append(row)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["case_id", "ct", "pathology", "genomics", "label", "site"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    manifest = out / "manifest.csv"
    write_atomic(manifest, buf.getvalue().encode())
    return manifest
