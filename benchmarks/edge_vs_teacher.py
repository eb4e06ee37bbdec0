"""Edge model vs teacher, side by side in one run, each in a fresh process, batch 1, full
three-modality cases, the clinic's thread count: the `full` teacher (ResNet-50 + 3D ResNet, torch,
untrained weights: its cost does not depend on them), the tiny teacher and student in torch (from
the demo's checkpoints), the student as FP32 ONNX and every INT8 variant of the bundle.

Figures: p50/p95 model time (encoders + head; preprocessing, i.e. reading and resampling, reported
separately), time per modality, whole-process peak RSS, held-out AUC, size on disk.

Usage: python benchmarks/edge_vs_teacher.py [--out demo-out] [--cases 60] [--teacher-runs 8] [--threads 2]
(run `bash scripts/demo.sh` or `edge-export pipeline --out demo-out --config tiny` first)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import png_path, run_json, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

TORCH_WORKER = r"""
import json, sys, time
import numpy as np, torch
from export.config import get_config
from export.data import collate
from export.models import Student, Teacher, count_parameters
from edge_runtime.preprocess import Preprocessing
from edge_runtime.profiling import peak_rss_mb, percentiles
from edge_runtime.synthetic import SynthConfig, SyntheticCohort
what, config, ckpt, runs, threads, pre_file = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
torch.set_num_threads(threads)
torch.manual_seed(0)
cfg = get_config(config)
pre = Preprocessing.from_dict(json.loads(open(pre_file).read()))
n_genes = len(pre.genomics.genes)
model = (Teacher(cfg.model, n_genes, 2) if what == "teacher" else Student(cfg.model, n_genes, 2))
if ckpt != "-":
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)[what])
model.eval()
cohort = SyntheticCohort(SynthConfig(seed=0, spec=cfg.input))
cases = [c for c in (cohort.case(2_000_000 + i) for i in range(200)) if len(c.modalities) == 3][: runs + 2]
batches = [collate([c], pre) for c in cases]
times, per_mod = [], {"ct": [], "pathology": [], "genomics": []}
with torch.no_grad():
    for i, b in enumerate(batches):
        start = time.perf_counter()
        model(b.inputs, b.mask)
        total = (time.perf_counter() - start) * 1e3
        if i >= 2:
            times.append(total)
    if what == "teacher":
        for m in per_mod:
            for b in batches[2:]:
                start = time.perf_counter()
                model.encoders[m](b.inputs[m])
                per_mod[m].append((time.perf_counter() - start) * 1e3)
print(json.dumps({"model_ms": percentiles(times), "per_modality_ms": {m: percentiles(v) for m, v in per_mod.items() if v},
                  "peak_rss_mb": round(peak_rss_mb(), 1), "parameters": count_parameters(model)}))
"""


def torch_run(what: str, config: str, ckpt: str, runs: int, threads: int, pre_file: Path) -> dict:
    return run_json([sys.executable, "-c", TORCH_WORKER, what, config, ckpt, str(runs), str(threads), str(pre_file)], ROOT)


def main() -> None:
    from edge_runtime import MODALITIES
    from edge_runtime.measure import Request, measure

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "demo-out", help="pipeline output folder")
    parser.add_argument("--cases", type=int, default=60, help="cases per ONNX variant")
    parser.add_argument("--teacher-runs", type=int, default=8, help="cases for the full teacher (about 2 s each)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    bundle = args.out / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    auc = manifest["metrics"]["auc"]
    pre_file = args.out / "preprocessing.json"
    pre_file.write_text(json.dumps(manifest["preprocessing"]))
    ckpt = str(args.out / "checkpoints.pt")
    rows: dict[str, dict] = {}
    rows["teacher_full_torch"] = {**torch_run("teacher", "full", "-", args.teacher_runs, args.threads, pre_file),
                                  "auc": None, "note": "untrained weights; cost only"}
    rows["teacher_tiny_torch"] = {**torch_run("teacher", manifest["config"], ckpt, args.cases, args.threads, pre_file),
                                  "auc": auc["teacher"]}
    rows["student_torch_fp32"] = {**torch_run("student", manifest["config"], ckpt, args.cases, args.threads, pre_file),
                                  "auc": auc.get("student_fp32")}
    head = str(bundle / manifest["head"]["file"])
    for v in manifest["variants"]:
        request = Request({m: str(bundle / v["encoders"][m]) for m in MODALITIES}, head, manifest["preprocessing"],
                          manifest["classes"], int(manifest["embedding_dim"]), int(manifest["synthetic"]["seed"]),
                          int(manifest["synthetic"]["n_sites"]), cases=args.cases, threads=args.threads)
        fig = measure(request)
        size = sum((bundle / p).stat().st_size for p in v["encoders"].values()) + (bundle / manifest["head"]["file"]).stat().st_size
        rows[f"onnx_{v['name']}"] = {"model_ms": fig["model_ms"], "case_ms": fig["latency_ms"],
                                     "per_modality_ms": {k: fig["stages_ms"][k] for k in (*MODALITIES, "head") if k in fig["stages_ms"]},
                                     "preprocess_ms": fig["stages_ms"].get("preprocess"), "peak_rss_mb": fig["peak_rss_mb"],
                                     "auc": v.get("auc"), "val_auc": v.get("val_auc"), "size_bytes": size}
        print(json.dumps({"variant": v["name"], "model_p95_ms": fig["model_ms"]["p95"], "rss": fig["peak_rss_mb"]}), flush=True)
    chosen = rows[f"onnx_{manifest['default_variant']}"]
    full = rows["teacher_full_torch"]
    fp32_auc, teacher_auc = auc.get("student_fp32"), auc["teacher"]
    chosen_auc = auc.get(f"student_{manifest['default_variant']}")
    targets = {
        "chosen_variant": manifest["default_variant"],
        "chosen_model_p95_ms": chosen["model_ms"]["p95"], "target_model_p95_ms": 15.0,
        "chosen_peak_rss_mb": chosen["peak_rss_mb"], "target_peak_rss_mb": 150.0,
        "speedup_vs_full_teacher_p50": round(full["model_ms"]["p50"] / chosen["model_ms"]["p50"], 1), "target_speedup": 100,
        "memory_ratio_vs_full_teacher": round(full["peak_rss_mb"] / chosen["peak_rss_mb"], 2), "target_memory_ratio": 5,
        "auc_drop_vs_fp32_student": round(fp32_auc - chosen_auc, 4) if None not in (fp32_auc, chosen_auc) else None,
        "auc_drop_vs_teacher": round(teacher_auc - chosen_auc, 4) if chosen_auc is not None else None,
        "target_auc_drop": {"vs_fp32_student": 0.005, "vs_teacher": 0.02},
    }
    write_result("edge_vs_teacher", {"rows": rows, "targets": targets},
                 {"threads": args.threads, "cases": args.cases, "bundle_model_version": manifest["model_version"],
                  "selection": manifest.get("selection")})
    plot(rows, manifest["default_variant"])
    print(json.dumps(targets, indent=2))


def plot(rows: dict, chosen: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = ["tab:red" if n.startswith("teacher") else ("tab:green" if n == f"onnx_{chosen}" else "tab:blue") for n in names]
    ax.barh(names, [rows[n]["model_ms"]["p50"] for n in names], color=colors)
    ax.set_xscale("log")
    ax.set_xlabel("model time per full case, p50 ms (log)")
    ax.axvline(15, color="grey", ls=":", label="15 ms target (p95)")
    ax.legend(fontsize=7)
    ax.invert_yaxis()
    ax2.barh(names, [rows[n]["peak_rss_mb"] for n in names], color=colors)
    ax2.set_xscale("log")
    ax2.axvline(150, color="grey", ls=":", label="150 MB target")
    ax2.set_xlabel("whole-process peak RSS, MB (log)")
    ax2.legend(fontsize=7)
    ax2.invert_yaxis()
    ax2.set_yticklabels([])
    fig.suptitle(f"edge vs teacher, green = bundle default ({chosen})")
    fig.tight_layout()
    fig.savefig(png_path("edge_vs_teacher"), dpi=110)


if __name__ == "__main__":
    main()
