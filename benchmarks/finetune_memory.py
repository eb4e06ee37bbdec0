"""Peak RSS of `edge-run finetune` for 1k vs 10k local cases (target <= 350 MB, flat within 5 %).

Each size runs the real CLI in a fresh process (torch absent) on the micro bundle. The embedding
cache is filled beforehand with synthetic embeddings (running the encoders on 10k cases would take
the benchmark's time, not change what is measured: encoding is one case at a time and does not
depend on the cohort size), so the run measures manifest + cache + DP-SGD + validation + update.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import png_path, write_result  # noqa: E402

NO_TORCH = ("import sys, importlib.abc\n"
            "class B(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, n, p, t=None):\n"
            "        if n == 'torch' or n.startswith('torch.'): raise ModuleNotFoundError(n)\n"
            "sys.meta_path.insert(0, B())\n"
            "from edge_runtime.cli import main; sys.argv[0] = 'edge-run'; main()\n")


def micro_bundle(work: Path) -> Path:
    from export.config import get_config
    from export.pipeline import run_pipeline

    return run_pipeline(work / "micro", get_config("micro"), seed=3, log=lambda s: None).bundle_dir


def prepare(bundle: Path, work: Path, n: int, seed: int) -> tuple[Path, Path]:
    from edge_runtime import MODALITIES
    from edge_runtime.bundle import default_public_key_path, load_bundle
    from edge_runtime.finetune.cache import EmbeddingCache, encoder_key, fingerprint
    from edge_runtime.keys import load_public_key

    loaded = load_bundle(bundle, load_public_key(default_public_key_path(bundle)))
    dim, variant = int(loaded.manifest["embedding_dim"]), loaded.manifest["default_variant"]
    enc = {v["name"]: v["encoders"] for v in loaded.manifest["variants"]}[variant]
    folder, state = work / f"cases-{n}", work / f"state-{n}"
    folder.mkdir(parents=True)
    (folder / "g.csv").write_text("gene_id,value\nGENE00000,1.0\n")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    rows = [f"c{i:06d},,,g.csv,{'positive' if y else 'negative'},0" for i, y in enumerate(labels)]
    (folder / "manifest.csv").write_text("case_id,ct,pathology,genomics,label,site\n" + "\n".join(rows) + "\n")
    cache = EmbeddingCache(state / "cache", encoder_key(loaded.manifest, variant, enc), dim, len(MODALITIES))
    fp = fingerprint(["", "", "g.csv"], folder)
    for i, y in enumerate(labels):
        mask = (rng.random(3) > 0.3).astype(np.uint8)
        mask[rng.integers(3)] = 1
        emb = (rng.normal(0, 1, (3, dim)) + (2 * y - 1) * 0.3) * mask[:, None]
        cache.add(f"c{i:06d}", fp, emb, mask)
    cache.flush()
    return folder / "manifest.csv", state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", type=Path, default=None, help="bundle dir (default: build a micro bundle)")
    ap.add_argument("--sizes", default="1000,10000")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = args.bundle or micro_bundle(work)
        figures = {}
        for n in sizes:
            manifest, state = prepare(bundle, work, n, seed=n)
            cmd = [sys.executable, "-c", NO_TORCH, "finetune", "--bundle", str(bundle), "--manifest", str(manifest),
                   "--state", str(state), "--json", "--seed", "0"]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
            if proc.returncode != 0:
                raise SystemExit(proc.stderr)
            rep = json.loads(proc.stdout)
            figures[str(n)] = {"peak_rss_mb": rep["peak_rss_mb"], "train": rep["cases"]["train"], "steps": rep["privacy"]["steps"],
                               "noise_multiplier": rep["privacy"]["noise_multiplier"], "seconds": rep["seconds"]}
            print(n, figures[str(n)])
    peaks = [figures[str(n)]["peak_rss_mb"] for n in sizes]
    summary = {"max_peak_rss_mb": max(peaks), "growth_pct": round(100 * (peaks[-1] / peaks[0] - 1), 2),
               "target": "<= 350 MB, flat within 5 %", "pass": max(peaks) <= 350 and abs(peaks[-1] / peaks[0] - 1) <= 0.05}
    write_result("finetune_memory", {"by_cases": figures, **summary},
                 {"note": "micro bundle (embedding dim 16); cache pre-filled with synthetic embeddings; real CLI, fresh process, torch absent"})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar([f"{n:,} cases" for n in sizes], peaks, color="#4a7")
    ax.axhline(350, color="r", ls="--", label="target 350 MB")
    ax.set_ylabel("peak RSS MB (whole process)")
    ax.set_title("edge-run finetune memory")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path("finetune_memory"), dpi=110)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
