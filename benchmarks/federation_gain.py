"""Does joining the federation pay at the product's privacy price? K primary-care clinics (K in
{4, 16, 64}) with n labelled cases each (n in {100, 400}), lifetime epsilon = 0.5 per clinic
(delta 1e-5), from sites that differ from the bundle's training cohort (benchmarks/gain_data.py).
Each clinic is scored on its own 500 held-out cases:

    (a) start       the bundle's head
    (b) local       local-only DP fine-tuning that follows the bundle's plan (same rounds, steps, noise,
                    budget), each round starting from the clinic's own previous head
    (b0) local-v0   local-only DP fine-tuning as `edge-run finetune` did before plans (all 16.8 k
                    head parameters, Adam, the whole budget in one round)
    (c) federated   the global head after the plan's last round (clinic rounds, codec, the server's
                    arrival check and aggregation: server.simulation)
    (d) ceiling     the same federation without DP noise (clipping kept, exact metadata)
    (e) oracle      the generator's Bayes score from the modalities each case has

Paired per seed: the same clinics, cases, starting head and test sets for every method. The unit of
the intervals is the seed (one federation per seed; clinics within it share the global model): mean
over clinics per seed, then a t interval over seeds. Every clinic's ledger is checked: no clinic
spends more than its lifetime epsilon. Run: ``python benchmarks/federation_gain.py --bundle
demo-out/bundle`` (``--part SEED`` computes one seed into results/parts/, ``--combine`` writes the
JSON and PNG from the parts).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, png_path, write_result  # noqa: E402
from benchmarks.gain_data import Layout, clinic_data, first_case  # noqa: E402

NAME = "federation_gain"
METHODS = ("start", "local", "local_v0", "federated", "ceiling", "oracle")
EPSILON, DELTA = 0.5, 1e-5
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def auc_of(params, emb, mask, labels) -> float:
    from edge_runtime.finetune.head import forward, softmax
    from edge_runtime.metrics import roc_auc

    return roc_auc(labels == 1, softmax(forward(params, emb, mask.astype(np.float32)))[:, -1])


def run_seed(bundle_dir: Path, seed: int, *, clinics: list[int], cases: list[int], test: int, work: Path) -> dict:
    from edge_runtime.bundle import default_public_key_path, load_bundle
    from edge_runtime.finetune.cache import bundle_encoder_key
    from edge_runtime.finetune.plan import FinetunePlan
    from edge_runtime.keys import load_public_key
    from edge_runtime.metrics import roc_auc
    from edge_runtime.state import bundle_head
    from edge_runtime.synthetic import case_id
    from server.home import Config
    from server.simulation import SimClinic, clinic_round, server_round

    bundle = load_bundle(bundle_dir, load_public_key(default_public_key_path(bundle_dir)))
    start, _, _ = bundle_head(bundle)
    plan = FinetunePlan.of_manifest(bundle.manifest)
    key = bundle_encoder_key(bundle.manifest, bundle.manifest["default_variant"])
    layout = Layout(max(clinics), max(cases), test)
    data = clinic_data(bundle_dir, key, seed, layout, work)
    config = Config()  # the server's shipped defaults: the head federation's strategy and bounds
    t0 = time.perf_counter()

    def make(k: int, n: int) -> SimClinic:
        ids = [case_id(first_case(seed, k) + j) for j in range(n)]
        return SimClinic(f"clinic-s{seed}-{k:02d}", ids, data["emb"][k, :n], data["mask"][k, :n], data["labels"][k, :n])

    def test_auc(params, k: int) -> float:
        sl = slice(layout.labelled, layout.labelled + test)
        return auc_of(params, data["emb"][k, sl], data["mask"][k, sl], data["labels"][k, sl])

    def local(k: int, n: int, p: FinetunePlan, tag: int) -> tuple[float, float]:
        clinic, head = make(k, n), start
        for r in range(p.rounds):
            delta, _ = clinic_round(clinic, head, p, np.random.default_rng([seed, n, tag, r, k]), epsilon_total=EPSILON, delta=DELTA)
            head = {**head, **{name: (head[name] + d).astype(np.float32) for name, d in delta.items()}}
        return test_auc(head, k), clinic.spent(DELTA)

    def federation(K: int, n: int, private: bool, tag: int) -> tuple[list[float], float, list[dict]]:
        members, head, weights, kept = [make(k, n) for k in range(K)], start, [], None
        for r in range(plan.rounds):
            ups = []
            for k, c in enumerate(members):
                delta, meta = clinic_round(c, head, plan, np.random.default_rng([seed, n, K, tag, r, k]), epsilon_total=EPSILON,
                                           delta=DELTA, private=private)
                ups.append((c.name, delta, meta))
            result, kept = server_round(config, head, plan, ups, kept, ceiling=not private)
            head = {name: np.asarray(v, dtype=np.float32) for name, v in result.params.items()}
            weights.append(result.weights.get("shared", {}))
        spent = max(c.spent(DELTA) for c in members) if private else 0.0
        return [test_auc(head, k) for k in range(K)], spent, weights

    legacy = FinetunePlan()  # the rule before plans
    out: dict = {"seed": seed, "by_n": {}}
    for n in cases:
        K = max(clinics)
        sl = slice(layout.labelled, layout.labelled + test)
        per = {"start": [test_auc(start, k) for k in range(K)],
               "oracle": [roc_auc(data["labels"][k, sl] == 1, data["oracle"][k, sl]) for k in range(K)]}
        loc = [local(k, n, plan, 1) for k in range(K)]
        v0 = [local(k, n, legacy, 2) for k in range(K)]
        per["local"], per["local_v0"] = [a for a, _ in loc], [a for a, _ in v0]
        spent = [e for _, e in loc] + [e for _, e in v0]
        fed = {}
        for K_ in clinics:
            aucs, eps, weights = federation(K_, n, True, 3)
            ceiling, _, _ = federation(K_, n, False, 4)
            spent.append(eps)
            fed[K_] = {"federated": aucs, "ceiling": ceiling, "max_weight_last_round": round(max(weights[-1].values()), 4)}
        out["by_n"][n] = {"per_clinic": per, "federations": fed, "max_epsilon_spent": max(spent),
                          "prevalence": [round(float(data["labels"][k, sl].mean()), 3) for k in range(K)]}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["plan"] = plan.to_dict()
    return out


def mean_ci(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return {"mean": round(float(v.mean()), 4), "ci95": None, "seeds": len(v)}
    half = T95.get(len(v) - 1, 1.96) * v.std(ddof=1) / np.sqrt(len(v))
    return {"mean": round(float(v.mean()), 4), "ci95": [round(float(v.mean() - half), 4), round(float(v.mean() + half), 4)],
            "seeds": len(v)}


def combine(parts: list[dict]) -> dict:
    """Per (K, n): each method's mean AUC, and paired differences with 95 % intervals over seeds."""
    figures: dict = {"rows": [], "max_epsilon_spent": max(p["by_n"][n]["max_epsilon_spent"] for p in parts for n in p["by_n"])}
    ns = sorted({int(n) for p in parts for n in p["by_n"]})
    Ks = sorted({int(K) for p in parts for n in p["by_n"] for K in p["by_n"][n]["federations"]})
    for n in ns:
        for K in Ks:
            seeds = {m: [] for m in METHODS}
            for p in parts:
                block = p["by_n"][str(n)] if str(n) in p["by_n"] else p["by_n"][n]
                fed = block["federations"].get(str(K)) or block["federations"].get(K)
                per = {m: np.asarray(block["per_clinic"][m][:K]) for m in ("start", "local", "local_v0", "oracle")}
                per["federated"], per["ceiling"] = np.asarray(fed["federated"]), np.asarray(fed["ceiling"])
                for m in METHODS:
                    seeds[m].append(per[m])
            row = {"clinics": K, "cases": n, "auc": {m: mean_ci([float(a.mean()) for a in seeds[m]]) for m in METHODS}}

            def diff(a: str, b: str) -> dict:
                return mean_ci([float((x - y).mean()) for x, y in zip(seeds[a], seeds[b])])

            row["federated_minus_start"] = diff("federated", "start")
            row["federated_minus_local"] = diff("federated", "local")
            row["federated_minus_local_v0"] = diff("federated", "local_v0")
            row["local_minus_start"] = diff("local", "start")
            row["ceiling_minus_federated"] = diff("ceiling", "federated")
            row["clinics_improved_vs_start"] = round(float(np.mean([np.mean(f > s) for f, s in zip(seeds["federated"], seeds["start"])])), 3)
            figures["rows"].append(row)
    target = next((r for r in figures["rows"] if r["clinics"] == 16 and r["cases"] == 400), None)
    if target is not None:
        lo = lambda d: d["ci95"][0] if d["ci95"] else -1.0  # noqa: E731
        diffs = {k: target[k] for k in ("federated_minus_start", "federated_minus_local", "federated_minus_local_v0")}
        figures["target"] = {
            "text": "K = 16, n = 400: federated >= start + 0.02 and >= local-only + 0.02 (both local-only variants), "
                    "95 % intervals above 0",
            **diffs, "met": {k: bool(d["mean"] >= 0.02 and lo(d) > 0) for k, d in diffs.items()},
        }
    figures["gain_over_local_grows_with_K"] = {
        str(n): [r["federated_minus_local_v0"]["mean"] for r in figures["rows"] if r["cases"] == n] for n in ns}
    figures["budget_kept"] = bool(figures["max_epsilon_spent"] <= EPSILON + 1e-9)
    return figures


def plot(figures: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({r["cases"] for r in figures["rows"]})
    fig, axes = plt.subplots(2, len(ns), figsize=(5 * len(ns), 7), sharex=True, squeeze=False)
    colours = {"start": "#999", "local": "#c84", "local_v0": "#e9b", "federated": "#27a", "ceiling": "#7bd", "oracle": "#333"}
    diffs = {"federated_minus_start": "federated − start", "federated_minus_local": "federated − local (plan)",
             "federated_minus_local_v0": "federated − local (before plans)", "ceiling_minus_federated": "ceiling − federated"}
    for col, n in enumerate(ns):
        rows = [r for r in figures["rows"] if r["cases"] == n]
        Ks = [r["clinics"] for r in rows]
        top, bottom = axes[0][col], axes[1][col]
        for m in METHODS:
            top.plot(Ks, [r["auc"][m]["mean"] for r in rows], marker="o", color=colours[m], label=m,
                     ls="--" if m in ("ceiling", "oracle") else "-")
        top.set_title(f"n = {n} labelled cases per clinic, ε = 0.5 lifetime")
        top.set_ylabel("mean held-out AUC per clinic")
        for (key, label), colour in zip(diffs.items(), ("#27a", "#c84", "#e9b", "#7bd")):
            mean = [r[key]["mean"] for r in rows]
            ci = [r[key]["ci95"] or [r[key]["mean"]] * 2 for r in rows]
            bottom.errorbar(Ks, mean, yerr=[[m - c[0] for m, c in zip(mean, ci)], [c[1] - m for m, c in zip(mean, ci)]],
                            marker="o", capsize=3, color=colour, label=label)
        bottom.axhline(0.0, color="#444", lw=0.8)
        bottom.axhline(0.02, color="#2a2", lw=0.8, ls=":")
        bottom.set_ylabel("paired difference in AUC (95 % interval over seeds)")
        bottom.set_xlabel("clinics in the federation (K)")
        bottom.set_xscale("log", base=2)
        bottom.set_xticks(Ks, [str(k) for k in Ks])
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    axes[1][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(png_path(NAME), dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=ROOT / "demo-out" / "bundle")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--clinics", default="4,16,64")
    ap.add_argument("--cases", default="100,400")
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dwfl-federation-gain"), help="embedding cache of the cohorts")
    ap.add_argument("--part", type=int, default=None, help="compute this seed only, into results/parts/")
    ap.add_argument("--combine", action="store_true", help="combine the parts of --seeds into the result")
    args = ap.parse_args()
    clinics = [int(k) for k in args.clinics.split(",")]
    cases = [int(n) for n in args.cases.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    parts_dir = RESULTS / "parts"
    if args.part is not None:
        parts_dir.mkdir(parents=True, exist_ok=True)
        doc = run_seed(args.bundle, args.part, clinics=clinics, cases=cases, test=args.test, work=args.work)
        (parts_dir / f"{NAME}-s{args.part}.json").write_text(json.dumps(doc) + "\n")
        print(json.dumps({"seed": args.part, "seconds": doc["seconds"]}))
        return
    if not args.combine:
        for s in seeds:
            doc = run_seed(args.bundle, s, clinics=clinics, cases=cases, test=args.test, work=args.work)
            parts_dir.mkdir(parents=True, exist_ok=True)
            (parts_dir / f"{NAME}-s{s}.json").write_text(json.dumps(doc) + "\n")
    parts = [json.loads((parts_dir / f"{NAME}-s{s}.json").read_text()) for s in seeds]
    figures = combine(parts)
    figures["plan"] = parts[0]["plan"]
    figures["seconds_per_seed"] = [p["seconds"] for p in parts]
    write_result(NAME, figures, {"bundle": str(args.bundle), "settings": {"clinics": clinics, "cases": cases, "test": args.test,
                                                                           "seeds": seeds, "epsilon": EPSILON, "delta": DELTA},
                                 "note": __doc__.split("\n\n")[0].replace("\n", " ")})
    plot(figures)
    print(json.dumps(figures["target"] if "target" in figures else figures["rows"][:1], indent=1))


if __name__ == "__main__":
    main()
