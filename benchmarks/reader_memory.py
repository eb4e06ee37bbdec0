"""Peak RSS of reading a CT DICOM series of growing size (512x512 slices) through the clinic reader,
side by side with the naive way (stack every slice's pixels into one volume, then resample).

Each measurement runs in a fresh subprocess; the import-only baseline is measured the same way.
Usage: python benchmarks/reader_memory.py [--slices 50,100,200,400]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import png_path, write_result  # noqa: E402
from export.synth_files import write_dicom_series  # noqa: E402

PROBE = r"""
import json, sys, time
from pathlib import Path
import numpy as np
from edge_runtime.readers.ct import TargetGrid, read_ct
from edge_runtime.harmonize import resample_volume
import pydicom
mode, folder = sys.argv[1], Path(sys.argv[2])
target = TargetGrid((32, 128, 128), (5.0, 2.5, 2.5))
start = time.perf_counter()
if mode == "reader":
    vol = read_ct(folder, target)
elif mode == "naive":
    files = [pydicom.dcmread(f) for f in folder.iterdir()]
    files.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    full = np.stack([d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in files])
    sp = [float(v) for v in files[0].PixelSpacing]
    vol = resample_volume(full, (float(files[0].SliceThickness), sp[0], sp[1]), target.grid, target.spacing_mm)
seconds = time.perf_counter() - start
from edge_runtime.profiling import peak_rss_mb
print(json.dumps({"peak_rss_mb": peak_rss_mb(), "seconds": seconds}))
"""


def measure(mode: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(folder)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout)


def make_series(folder: Path, n_slices: int) -> None:
    z = np.arange(n_slices, dtype=np.float32)[:, None, None]
    yy, xx = np.mgrid[:512, :512].astype(np.float32)
    vol = np.where(((yy - 256) / 220) ** 2 + ((xx - 256) / 230) ** 2 < 1, 40.0, -1000.0)[None] + 0.0 * z
    vol = vol + (np.sin(z / 7.0) * 30.0)
    write_dicom_series(vol.astype(np.float32), (1.0, 0.7, 0.7), folder, f"bench{n_slices}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", default="50,100,200,400")
    args = parser.parse_args()
    sizes = [int(s) for s in args.slices.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        baseline = measure("imports", Path(tmp))
        for n in sizes:
            folder = Path(tmp) / f"s{n}"
            make_series(folder, n)
            reader, naive = measure("reader", folder), measure("naive", folder)
            rows.append({
                "slices": n,
                "volume_mb_float32": round(512 * 512 * n * 4 / 1e6, 1),
                "reader_peak_rss_mb": round(reader["peak_rss_mb"], 1),
                "reader_seconds": round(reader["seconds"], 2),
                "naive_peak_rss_mb": round(naive["peak_rss_mb"], 1),
                "naive_seconds": round(naive["seconds"], 2),
            })
            print(rows[-1], flush=True)
            for f in folder.iterdir():
                f.unlink()
    write_result("reader_memory", {"import_baseline_rss_mb": round(baseline["peak_rss_mb"], 1), "rows": rows})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["slices"] for r in rows]
    ax.plot(x, [r["reader_peak_rss_mb"] for r in rows], "o-", label="edge_runtime reader (slice by slice)")
    ax.plot(x, [r["naive_peak_rss_mb"] for r in rows], "s--", label="naive: stack whole series, then resample")
    ax.plot(x, [r["volume_mb_float32"] for r in rows], ":", color="grey", label="full-resolution volume (float32)")
    ax.axhline(baseline["peak_rss_mb"], color="black", lw=0.8, label="imports only")
    ax.set_xlabel("slices of 512 x 512")
    ax.set_ylabel("peak RSS of a fresh process (MB)")
    ax.set_title("Reading a CT DICOM series into the 32x128x128 grid")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path("reader_memory"), dpi=110)


if __name__ == "__main__":
    main()
