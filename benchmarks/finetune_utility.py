"""Utility of clinic fine-tuning at a site with feature shift: test AUC of the bundle head, after
non-DP fine-tuning, and after DP-SGD at epsilon = 0.5 (delta 1e-5, planned exactly as
`edge-run finetune` plans it), with 2,000 local cases (80 % train, 20 % validation) and 1,000 held-out
test cases of the same site. Target: DP loses <= 0.03 AUC against non-DP.

The site: the bundle's synthetic cohort with site 1's profile shifted (CT offset +60 HU and scale
1.25, stain shift, genomics batch effect 0.8). Cases are generated in memory and embedded by the
bundle's INT8 encoders through EdgeModel (the clinic's code); the training is the library's
DP-SGD (edge_runtime.finetune.dpsgd) on those embeddings.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import png_path, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", type=Path, default=None, help="bundle dir (default: build a micro bundle)")
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.01)
    args = ap.parse_args()

    from edge_runtime import MODALITIES
    from edge_runtime.bundle import default_public_key_path, load_bundle
    from edge_runtime.finetune import dpsgd
    from edge_runtime.finetune.head import forward, softmax
    from edge_runtime.finetune.plan import FinetunePlan
    from edge_runtime.finetune.run import FinetuneOptions
    from edge_runtime.state import bundle_head
    from edge_runtime.keys import load_public_key
    from edge_runtime.metrics import roc_auc
    from edge_runtime.model import EdgeModel
    from edge_runtime.preprocess import prepare_case
    from edge_runtime.privacy.accountant import plan_round
    from edge_runtime.synthetic import SynthConfig, SyntheticCohort

    with tempfile.TemporaryDirectory() as tmp:
        bundle_dir = args.bundle
        if bundle_dir is None:
            from benchmarks.finetune_memory import micro_bundle

            bundle_dir = micro_bundle(Path(tmp))
        bundle = load_bundle(bundle_dir, load_public_key(default_public_key_path(bundle_dir)))
        model = EdgeModel.from_bundle(bundle)
        start, dim, _ = bundle_head(bundle)
        pre, syn = bundle.preprocessing, bundle.manifest["synthetic"]
        from edge_runtime.synthetic import InputSpec

        spec = InputSpec(ct_grid=pre.ct.grid, tile=pre.pathology.tile, n_genes=len(pre.genomics.genes))
        cohort = SyntheticCohort(SynthConfig(seed=int(syn["seed"]), n_sites=int(syn["n_sites"]), spec=spec))
        site = 1
        cohort.sites[site] = replace(cohort.sites[site], ct_offset_hu=60.0, ct_scale=1.25, stain_shift=(35.0, -25.0, 20.0), batch_sd=0.8)

        def embed(first: int, n: int):
            emb = np.zeros((n, 3, dim), np.float32)
            mask = np.zeros((n, 3), np.float32)
            y = np.zeros(n, np.int64)
            for j, case in enumerate(cohort.iter_cases(first, n, site=site)):
                inputs = prepare_case(case, pre).inputs
                y[j] = case.label
                for i, m in enumerate(MODALITIES):
                    if m in inputs:
                        emb[j, i], mask[j, i] = model.embed(m, inputs[m]), 1
            return emb, mask, y

        local = embed(3_000_000, args.cases)
        test = embed(3_500_000, args.test)
    n_val = args.cases // 5
    tr = tuple(a[n_val:] for a in local)
    opts = FinetuneOptions(batch_size=args.batch_size, lr=args.lr)
    fp = opts.plan(FinetunePlan())  # the rule before federation plans: all parameters, Adam, one round

    def auc(params, data=test):
        return roc_auc(data[2] == 1, softmax(forward(params, data[0], data[1]))[:, -1])

    read = lambda idx: (tr[0][idx], tr[1][idx], tr[2][idx])  # noqa: E731
    n = len(tr[2])
    plan = plan_round([], n, fp.batch_size, fp.epochs, opts.meta_noise, 0.5, 1e-5)
    ev = plan.events
    seeds = [int(s) for s in args.seeds.split(",")]
    before = auc(start)
    nondp, dp = [], []
    for s in seeds:
        rng = np.random.default_rng(s)
        nondp.append(auc(dpsgd.train(start, n, read, dpsgd.TrainSpec(ev.steps, ev.sampling_rate, 0.0, None, fp.lr), rng)))
        rng = np.random.default_rng(s)
        dp.append(auc(dpsgd.train(start, n, read, dpsgd.TrainSpec(ev.steps, ev.sampling_rate, ev.noise_multiplier, fp.clip, fp.lr), rng)))
    figures = {
        "auc_before": round(before, 4), "auc_non_dp": round(float(np.mean(nondp)), 4), "auc_dp": round(float(np.mean(dp)), 4),
        "auc_non_dp_by_seed": [round(a, 4) for a in nondp], "auc_dp_by_seed": [round(a, 4) for a in dp],
        "dp_loss_vs_non_dp": round(float(np.mean(nondp) - np.mean(dp)), 4),
        "epsilon": round(plan.epsilon_after, 4), "delta": 1e-5, "noise_multiplier": round(ev.noise_multiplier, 3),
        "sampling_rate": round(ev.sampling_rate, 4), "steps": ev.steps, "clip": fp.clip, "meta_noise_multiplier": round(ev.meta_noise_multiplier, 2),
        "train_cases": n, "validation_cases": n_val, "test_cases": args.test,
        "target": "DP loss <= 0.03 AUC vs non-DP", "pass": bool(np.mean(nondp) - np.mean(dp) <= 0.03),
    }
    write_result("finetune_utility", figures, {"bundle": bundle.manifest.get("config"), "note": __doc__.split("\n\n")[1].replace("\n", " ")})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(["bundle head", "non-DP fine-tune", "DP ε=0.5"], [before, np.mean(nondp), np.mean(dp)], color=["#999", "#47a", "#4a7"],
           yerr=[0, np.std(nondp), np.std(dp)])
    ax.set_ylim(0.5, 1.0)
    ax.set_ylabel("test AUC (shifted site)")
    ax.set_title(f"fine-tuning, {args.cases} local cases")
    fig.tight_layout()
    fig.savefig(png_path("finetune_utility"), dpi=110)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
