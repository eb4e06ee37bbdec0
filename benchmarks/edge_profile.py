"""`edge-run profile` of a bundle, each encoder variant in its own fresh process, side by side:
latency p50/p95/p99 per case, per modality subset (a case without CT skips the 3D encoder), and
whole-process peak RSS, against the clinic budgets.

Usage: python benchmarks/edge_profile.py [--bundle demo-out/bundle] [--cases 200] [--threads 2]
(run `bash scripts/demo.sh` first, or point --bundle at any bundle with its .pub beside it)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import png_path, write_result  # noqa: E402
from tests.conftest import NO_TORCH  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def profile(bundle: Path, variant: str, cases: int, threads: int) -> dict:
    cmd = [sys.executable, "-c", NO_TORCH.format(module="edge_runtime.cli", prog="edge-run"),
           "profile", "--bundle", str(bundle), "--variant", variant, "--cases", str(cases), "--threads", str(threads), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode not in (0, 1):
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path, default=ROOT / "demo-out" / "bundle")
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    reports = {v["name"]: profile(args.bundle, v["name"], args.cases, args.threads) for v in manifest["variants"]}
    figures = {
        name: {
            "latency_ms": r["latency_ms"],
            "peak_rss_mb": r["peak_rss_mb"],
            "pass": r["pass"],
            "latency_ms_by_modalities": r["latency_ms_by_modalities"],
            "auc_held_out": next(v["auc"] for v in manifest["variants"] if v["name"] == name),
        }
        for name, r in reports.items()
    }
    budgets = next(iter(reports.values()))["budgets"]
    write_result("edge_profile", figures, {"bundle_model_version": manifest["model_version"], "config": manifest.get("config"),
                                           "budgets": budgets, "threads": args.threads, "cases": args.cases})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subsets = sorted({k for r in reports.values() for k in r["latency_ms_by_modalities"]}, key=lambda k: (k.count("+"), k))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(reports)
    for i, (name, r) in enumerate(reports.items()):
        vals = [r["latency_ms_by_modalities"].get(s, {}).get("p50", 0) for s in subsets]
        ax.bar([j + i * width for j in range(len(subsets))], vals, width, label=f"{name} (p50)")
    ax.set_xticks([j + width * (len(reports) - 1) / 2 for j in range(len(subsets))])
    ax.set_xticklabels([s.replace("+", "\n+") for s in subsets], fontsize=7)
    ax.set_ylabel("latency per case (ms)")
    ax.set_title(f"Latency by modalities present ({args.threads} threads); budget {budgets['latency_ms']:g} ms")
    ax.legend()
    names = list(reports)
    ax2.bar(names, [reports[n]["peak_rss_mb"] for n in names], color="tab:green")
    ax2.axhline(budgets["mem_mb"], color="red", ls="--", label=f"budget {budgets['mem_mb']:g} MB")
    ax2.set_ylabel("whole-process peak RSS (MB)")
    ax2.set_yscale("log")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path("edge_profile"), dpi=110)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
