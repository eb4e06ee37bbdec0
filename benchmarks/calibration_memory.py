"""Streaming calibration: peak RSS of INT8 calibration of each encoder of the demo bundle with 64 vs
512 calibration cases, each run in a fresh process. Cases are generated and preprocessed one at a
time (StreamingReader); MinMax keeps only per-case ranges, so memory must not grow with the count.

Usage: python benchmarks/calibration_memory.py [--bundle demo-out/bundle] [--counts 64,512]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import png_path, run_json, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, tempfile, time
from pathlib import Path
from edge_runtime.preprocess import Preprocessing, prepare_case
from edge_runtime.profiling import peak_rss_mb
from edge_runtime.synthetic import InputSpec, SynthConfig, SyntheticCohort
from quantize.calibration import StreamingReader
from quantize.static import quantize_int8
manifest_path, modality, count, method = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
bundle = Path(manifest_path).parent
manifest = json.loads(Path(manifest_path).read_text())
pre = Preprocessing.from_dict(manifest["preprocessing"])
spec = InputSpec(ct_grid=pre.ct.grid, tile=pre.pathology.tile, n_genes=len(pre.genomics.genes))
cohort = SyntheticCohort(SynthConfig(seed=manifest["synthetic"]["seed"], spec=spec))
fp32 = bundle / {v["name"]: v for v in manifest["variants"]}["fp32"]["encoders"][modality]
def inputs():
    served, index = 0, 0
    while served < count:
        prepared = prepare_case(cohort.case(index), pre).inputs
        index += 1
        if modality in prepared:
            served += 1
            yield {"x": prepared[modality]}
reader = StreamingReader(inputs)
start = time.perf_counter()
with tempfile.TemporaryDirectory() as tmp:
    quantize_int8(fp32, Path(tmp) / "q.onnx", reader, method=method)
print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1), "cases": reader.count, "seconds": round(time.perf_counter() - start, 1)}))
"""


def run(manifest: Path, modality: str, count: int, method: str) -> dict:
    return run_json([sys.executable, "-c", WORKER, str(manifest), modality, str(count), method], ROOT)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path, default=ROOT / "demo-out" / "bundle")
    parser.add_argument("--counts", default="64,512")
    parser.add_argument("--modalities", default="ct,pathology,genomics")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    figures: dict[str, dict] = {}
    start = time.perf_counter()
    for modality in args.modalities.split(","):
        figures[modality] = {str(n): run(args.bundle / "manifest.json", modality, n, "minmax") for n in counts}
        lo, hi = figures[modality][str(counts[0])], figures[modality][str(counts[-1])]
        figures[modality]["growth_percent"] = round(100 * (hi["peak_rss_mb"] / lo["peak_rss_mb"] - 1), 1)
        print(json.dumps({modality: figures[modality]}), flush=True)
    write_result("calibration_memory", figures, {"method": "minmax (streamed)", "seconds": round(time.perf_counter() - start, 1)})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    mods = list(figures)
    width = 0.8 / len(counts)
    for i, n in enumerate(counts):
        ax.bar([j + i * width for j in range(len(mods))], [figures[m][str(n)]["peak_rss_mb"] for m in mods], width,
               label=f"{n} calibration cases")
    ax.set_xticks([j + width * (len(counts) - 1) / 2 for j in range(len(mods))], mods)
    ax.set_ylabel("peak RSS of the calibration process (MB)")
    ax.set_title("INT8 calibration memory, cases streamed one at a time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path("calibration_memory"), dpi=110)


if __name__ == "__main__":
    main()
