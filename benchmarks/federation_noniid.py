"""Non-IID federation: DW-FL vs FedAvg vs FedProx vs FedAvgM vs centralized vs local-only.

Sites differ in label prevalence (Dirichlet label skew, --label-alpha), scanner calibration/noise,
stain colour, genomics batch effect and which modalities they have (the synthetic cohort's site
profiles). Every method is scored on each site's own held-out test cases; per seed we take the mean
and the worst site, then average over seeds. Federated strategies use the model after the last
round; centralized (all sites' cases pooled) and local-only (each site alone) train for as many
epochs as the federation has rounds x local epochs and keep their best validation epoch.

Usage: python benchmarks/federation_noniid.py [--seeds 0,1,2] [--sites 4] [--rounds 4] [--cases-per-site 96]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import png_path, write_result  # noqa: E402

FL_STRATEGIES = ("dwfl", "fedavg", "fedprox", "fedavgm")


def baselines(cfg, spec, seed: int, folder: Path) -> dict[str, dict[str, float]]:
    """Test AUC per site of centralized and local-only training on the very same site caches."""
    from export.data import ConcatCases
    from export.federated import evaluate_site, prepare_cohort, prepare_sites
    from export.models import Teacher
    from export.train import train_teacher

    cohort, pre = prepare_cohort(cfg, spec, seed)
    sites = prepare_sites(cohort, pre, spec, folder)
    train_cfg = dataclasses.replace(cfg.train, teacher_epochs=spec.rounds * spec.local_epochs)

    def new_teacher():
        return Teacher(cfg.model, cfg.input.n_genes, len(cfg.classes), cfg.train.contrastive_temperature)

    pooled = train_teacher(new_teacher(), ConcatCases([s.train for s in sites]), ConcatCases([s.val for s in sites]),
                           train_cfg, seed, lambda _: None)
    out = {"centralized": {}, "local": {}}
    for s in sites:
        out["centralized"][f"site{s.index}"] = round(evaluate_site(pooled, s.test, cfg.train.batch_size)[1], 4)
        alone = train_teacher(new_teacher(), s.train, s.val, train_cfg, seed + 100 + s.index, lambda _: None)
        out["local"][f"site{s.index}"] = round(evaluate_site(alone, s.test, cfg.train.batch_size)[1], 4)
    return out


def main() -> None:
    import torch

    from export.config import get_config
    from export.federated import FederationSpec, run_federation

    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cases-per-site", type=int, default=96)
    parser.add_argument("--val-per-site", type=int, default=40)
    parser.add_argument("--test-per-site", type=int, default=80)
    parser.add_argument("--label-alpha", type=float, default=0.5)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--temperature", type=float, default=1.0, help="DW-FL temperature T of the dynamic share.")
    parser.add_argument("--strategies", default=",".join((*FL_STRATEGIES, "centralized", "local")))
    parser.add_argument("--tag", default="", help="suffix of the result files, for variant runs")
    args = parser.parse_args()
    chosen = args.strategies.split(",")
    torch.set_num_threads(2)
    cfg = get_config(args.config)
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed: dict[str, list[dict]] = {m: [] for m in chosen}
    curves: dict[str, list[list[float]]] = {m: [] for m in FL_STRATEGIES if m in chosen}
    for seed in seeds:
        spec = FederationSpec(sites=args.sites, rounds=args.rounds, cases_per_site=args.cases_per_site,
                              val_per_site=args.val_per_site, test_per_site=args.test_per_site, label_alpha=args.label_alpha,
                              temperature=args.temperature)
        for strategy in curves:
            spec = dataclasses.replace(spec, strategy=strategy)
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                result = run_federation(Path(tmp), cfg, spec, seed, log=lambda _: None)
            per_seed[strategy].append(result["test_auc"])
            curves[strategy].append([float(np.mean(list(r["val_auc"].values()))) for r in result["rounds"]])
            print(json.dumps({"seed": seed, "strategy": strategy, "test_auc": result["test_auc"],
                              "seconds": round(time.perf_counter() - start, 1)}), flush=True)
        if {"centralized", "local"} & set(chosen):
            with tempfile.TemporaryDirectory() as tmp:
                base = baselines(cfg, spec, seed, Path(tmp))
            for name, aucs in base.items():
                if name in per_seed:
                    per_seed[name].append(aucs)
                    print(json.dumps({"seed": seed, "strategy": name, "test_auc": aucs}), flush=True)
    table = {}
    for name, runs in per_seed.items():
        means = [float(np.mean(list(r.values()))) for r in runs]
        worst = [float(np.min(list(r.values()))) for r in runs]
        table[name] = {"mean_auc": round(float(np.mean(means)), 4), "mean_auc_sd": round(float(np.std(means)), 4),
                       "worst_site_auc": round(float(np.mean(worst)), 4), "per_seed": runs}
    targets = {"target": "worst-site gap >= +0.02 and mean gap >= -0.01"}
    if {"dwfl", "fedavg", "centralized"} <= set(table):
        targets["dwfl_worst_minus_fedavg_worst"] = round(table["dwfl"]["worst_site_auc"] - table["fedavg"]["worst_site_auc"], 4)
        targets["dwfl_mean_minus_centralized_mean"] = round(table["dwfl"]["mean_auc"] - table["centralized"]["mean_auc"], 4)
    result_name = "federation_noniid" + (f"_{args.tag}" if args.tag else "")
    write_result(result_name, {"table": table, "targets": targets}, {"settings": {k: v for k, v in vars(args).items()}, "beta": 0.3})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in curves.items():
        mean = np.mean(np.array(runs), axis=0)
        ax.plot(range(1, len(mean) + 1), mean, "o-", label=name)
    for base_name, style in (("centralized", "--"), ("local", ":")):
        if base_name in table:
            ax.axhline(table[base_name]["mean_auc"], ls=style, color="grey", label=f"{base_name} (test, final)")
    ax.set_xlabel("round")
    ax.set_ylabel("mean site validation AUC")
    ax.set_title(f"{args.sites} non-IID sites, label alpha {args.label_alpha}, seeds {args.seeds}, T {args.temperature:g}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path(result_name), dpi=110)
    print(json.dumps({"table": {k: {kk: vv for kk, vv in v.items() if kk != "per_seed"} for k, v in table.items()},
                      "targets": targets}, indent=2))


if __name__ == "__main__":
    main()
