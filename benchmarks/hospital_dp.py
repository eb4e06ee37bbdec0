"""The federated teacher's AUC under record-level DP at the hospitals: lifetime epsilon in
{0.5, 2, 8} per hospital (delta 1e-5) against no DP (issue 16, Deliver 2).

The federation is the simulation a networked one equals (tests/test_hospital.py): 3 sites of the
synthetic cohort (non-IID), the tiny teacher, ROUNDS rounds of dwfl_mw, one local epoch, FedBN;
under DP every site runs `export.hospital_dp.dp_site_round` (Opacus per-case gradients, clip 1,
Poisson sampling, the round planned by the clinic's accountant inside epsilon / ROUNDS, charged to
the site's own ledger before training). Paired per seed: the same cohort, initialisation, sites and
test cases for every epsilon. Figures: per-site held-out AUC of the final global teacher as each
site runs it (its own normalisation layers), mean over sites; differences against no DP per seed,
with a 95 % bootstrap interval over seeds.

Settings fixed before the first run: 3 sites x 160 training / 40 validation / 300 test cases,
4 rounds, seeds 0-2 (about 25 minutes on 2 cores).

    python benchmarks/hospital_dp.py [--seeds 0-2] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, png_path, write_result  # noqa: E402

EPSILONS = (0.5, 2.0, 8.0, None)


def seeds_of(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def run_one(seed: int, eps: float | None, args) -> dict:
    import torch

    from export.config import get_config
    from export.federated import FederationSpec, run_federation

    torch.set_num_threads(args.threads)
    spec = FederationSpec(sites=args.sites, rounds=args.rounds, cases_per_site=args.cases, val_per_site=args.val,
                          test_per_site=args.test, dp_epsilon=eps)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hospital-dp-") as tmp:
        result = run_federation(Path(tmp), get_config("tiny"), spec, seed=seed, log=lambda _m: None)
        spent = {}
        for ledger in Path(tmp, "privacy").glob("*/ledger.jsonl"):
            last = json.loads(ledger.read_text().strip().splitlines()[-1])
            spent[ledger.parent.name] = round(last["epsilon_after"], 4)
    aucs = result["test_auc"]
    return {"seed": seed, "epsilon": eps, "site_auc": aucs, "mean_auc": round(float(np.mean(list(aucs.values()))), 4),
            "worst_auc": round(float(min(aucs.values())), 4), "epsilon_spent": spent, "seconds": round(time.perf_counter() - t, 1)}


def bootstrap(diffs: list[float], seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    d = np.asarray(diffs)
    means = rng.choice(d, size=(10_000, len(d)), replace=True).mean(axis=1)
    return [round(float(np.quantile(means, 0.025)), 4), round(float(np.quantile(means, 0.975)), 4)]


def summarise(runs: list[dict]) -> dict:
    table = {}
    for eps in EPSILONS:
        key = "none" if eps is None else f"{eps:g}"
        mine = [r for r in runs if r["epsilon"] == eps]
        base = {r["seed"]: r for r in runs if r["epsilon"] is None}
        row = {"mean_auc": round(float(np.mean([r["mean_auc"] for r in mine])), 4) if mine else None,
               "worst_site_auc": round(float(np.mean([r["worst_auc"] for r in mine])), 4) if mine else None, "seeds": len(mine)}
        if eps is not None:
            diffs = [r["mean_auc"] - base[r["seed"]]["mean_auc"] for r in mine if r["seed"] in base]
            if diffs:
                row["vs_none"] = round(float(np.mean(diffs)), 4)
                row["vs_none_ci95"] = bootstrap(diffs)
            row["epsilon_spent_max"] = max((max(r["epsilon_spent"].values()) for r in mine if r["epsilon_spent"]), default=None)
        table[key] = row
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0-2")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--cases", type=int, default=160)
    ap.add_argument("--val", type=int, default=40)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    part = RESULTS / "hospital_dp.parts.jsonl"  # each run appended as it ends: a long run loses nothing
    done = [json.loads(x) for x in part.read_text().splitlines()] if part.exists() else []
    for seed in seeds_of(args.seeds):
        for eps in EPSILONS:
            if any(r["seed"] == seed and r["epsilon"] == eps for r in done):
                continue
            run = run_one(seed, eps, args)
            print(json.dumps(run), flush=True)
            done.append(run)
            with open(part, "a") as fh:
                fh.write(json.dumps(run) + "\n")
    table = summarise(done)
    settings = {k: getattr(args, k) for k in ("rounds", "sites", "cases", "val", "test")}
    write_result("hospital_dp", {"table": table, "settings": settings, "strategy": "dwfl_mw", "config": "tiny", "delta": 1e-5},
                 {"runs": done})
    plot(table, png_path("hospital_dp"))
    print(json.dumps(table, indent=2))


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in table if table[k]["mean_auc"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(keys, [table[k]["mean_auc"] for k in keys], color=["#c33", "#e93", "#3a6", "#36c"][: len(keys)])
    for i, k in enumerate(keys):
        ci = table[k].get("vs_none_ci95")
        label = f"{table[k]['mean_auc']:.3f}" + (f"\n{table[k]['vs_none']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
        ax.text(i, table[k]["mean_auc"] + 0.01, label, ha="center", fontsize=8)
    ax.set_ylim(0.4, 1.0)
    ax.set_xlabel("lifetime epsilon per hospital (delta 1e-5)")
    ax.set_ylabel("teacher test AUC (mean over sites)")
    ax.set_title("Federated teacher under hospital DP-SGD (tiny, 3 sites)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
