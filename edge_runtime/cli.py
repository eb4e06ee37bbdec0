"""`edge-run`: the clinic's command line. Thin over the library; exit 0 ok, 1 over budget, 2 bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import MODALITIES
from .bundle import Bundle, default_public_key_path, load_bundle
from .cliutil import handle_errors
from .errors import BadInput, BundleError
from .keys import load_public_key
from .manifest import load_case, read_manifest
from .model import EdgeModel
from .measure import Request, measure
from .profiling import WARMUP_CASES, profile
from .select import Measured, choose
from .synthetic import InputSpec, SynthConfig, SyntheticCohort, parse_case_id
from .units import parse_duration_ms, parse_size_mb
from .variants import default_state_dir, resolve_variant, write_pin

PROFILE_FIRST_CASE = 2_000_000  # synthetic profile cases, disjoint from training and test indices


def bundle_options(fn):
    fn = click.option("--threads", default=2, show_default=True, type=click.IntRange(1, 64), help="ONNX Runtime intra-op threads.")(fn)
    fn = click.option("--variant", default=None,
                      help="Encoder variant from the bundle [default: pinned by `profile --select`, else the export's choice for this CPU].")(fn)
    fn = click.option("--state", "state_dir", type=click.Path(path_type=Path), default=None, envvar="EDGE_RUN_STATE",
                      help="Clinic state folder (variant pin, ...) [default: ~/.dwfl-edge].")(fn)
    fn = click.option(
        "--trusted-key", type=click.Path(path_type=Path), default=None, envvar="EDGE_RUN_TRUSTED_KEY",
        help="Pinned Ed25519 public key of the bundle signer [default: BUNDLE.pub next to the bundle].",
    )(fn)
    fn = click.option("--bundle", required=True, type=click.Path(path_type=Path), help="Bundle directory.")(fn)
    return fn


def open_bundle(bundle: Path, trusted_key: Path | None) -> Bundle:
    key = load_public_key(trusted_key or default_public_key_path(bundle))
    return load_bundle(bundle, key)


def synthetic_cohort(bundle: Bundle) -> SyntheticCohort:
    """The cohort the bundle was built on, with the bundle's own input shapes."""
    pre, synth = bundle.preprocessing, bundle.manifest.get("synthetic")
    spec = InputSpec(ct_grid=pre.ct.grid, tile=pre.pathology.tile, n_genes=len(pre.genomics.genes))
    try:
        config = SynthConfig(seed=int(synth["seed"]), n_sites=int(synth["n_sites"]), spec=spec)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{bundle.root}: bundle does not describe a synthetic cohort ({exc!r})") from exc
    return SyntheticCohort(config)


@click.group()
@click.version_option(package_name="dwfl-edge")
def main() -> None:
    """dwfl-edge clinic runtime: verified local inference and profiling, no torch needed."""


@main.command()
@bundle_options
@click.option("--manifest", type=click.Path(path_type=Path), default=None, help="Case manifest (CSV or JSONL).")
@click.option("--case-id", "case_ids", multiple=True, help="Synthetic case id (with --synthetic); repeatable.")
@click.option("--synthetic", is_flag=True, help="Take cases from the bundle's synthetic generator.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per case, one per line.")
@handle_errors
def infer(bundle: Path, trusted_key: Path | None, state_dir: Path | None, variant: str | None, threads: int, manifest: Path | None,
          case_ids: tuple[str, ...], synthetic: bool, as_json: bool) -> None:
    """Predict cases. The bundle's hashes and signature are verified first.

    With --manifest, each case either gets a prediction or is rejected with a reason; the others go
    on. Exit 2 when no case could be predicted.
    """
    if (manifest is None) == (not case_ids):
        raise BadInput("give either --manifest FILE or --case-id ID --synthetic")
    if case_ids and not synthetic:
        raise BadInput("--case-id needs --synthetic (real cases come from a --manifest)")
    indices = [parse_case_id(c) for c in case_ids]
    cases = read_manifest(manifest) if manifest is not None else None  # refuse a bad manifest before loading models
    loaded = open_bundle(bundle, trusted_key)
    model = EdgeModel.from_bundle(loaded, resolve_variant(loaded, variant, state_dir)[0], threads)
    if cases is None:
        cohort = synthetic_cohort(loaded)
        outcomes = ((str(i), lambda i=i: cohort.case(i)) for i in indices)
    else:
        outcomes = (
            (e.case_id, lambda e=e: load_case(e, cases.folder, loaded.preprocessing, loaded.classes)) for e in cases.entries
        )
    predicted = rejected = 0
    for case_id, load in outcomes:
        try:
            pred = model.predict(load())
        except BadInput as exc:
            rejected += 1
            _emit_rejection(case_id, str(exc), as_json)
            continue
        predicted += 1
        _emit_prediction(pred, as_json)
    if not predicted:
        click.echo(f"error: no case could be predicted ({rejected} rejected)", err=True)
        sys.exit(2)


def _emit_prediction(pred, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(pred.to_dict()))
        return
    click.echo(f"{pred.case_id}  {pred.label:<10} p={pred.probability:.3f}  [{'+'.join(pred.modalities)}]  {pred.latency_ms:.1f} ms")
    for warning in pred.warnings:
        click.echo(f"  warning: {warning}")


def _emit_rejection(case_id: str, reason: str, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"case_id": case_id, "rejected": True, "reason": reason}))
    else:
        click.echo(f"{case_id}  REJECTED: {reason}")


@main.command("profile")
@bundle_options
@click.option("--cases", default=50, show_default=True, type=click.IntRange(1, 100_000), help="Synthetic cases to time.")
@click.option("--mem-budget", default=None, help="Peak RSS budget, e.g. 1.8GB [default: the bundle's].")
@click.option("--latency-budget", default=None, help="p95 latency budget per case, e.g. 200ms [default: the bundle's].")
@click.option("--select", "select_variant", is_flag=True,
              help="Measure every variant of the bundle here, each in a fresh process, and pin the fastest that "
                   "meets accuracy and both budgets for this PC.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def profile_cmd(bundle: Path, trusted_key: Path | None, state_dir: Path | None, variant: str | None, threads: int,
                cases: int, mem_budget: str | None, latency_budget: str | None, select_variant: bool, as_json: bool) -> None:
    """Latency p50/p95/p99 (whole case and model alone) and whole-process peak RSS against the
    budgets; exit 1 when over. With --select: measure all variants and pin the best here."""
    # Parse budgets before any work, so a typo costs nothing.
    mem_mb = parse_size_mb(mem_budget) if mem_budget else None
    lat_ms = parse_duration_ms(latency_budget) if latency_budget else None
    loaded = open_bundle(bundle, trusted_key)
    budgets = loaded.manifest.get("budgets", {})
    mem_mb = mem_mb or float(budgets.get("mem_mb", 1800.0))
    lat_ms = lat_ms or float(budgets.get("latency_ms", 200.0))
    if select_variant:
        _select(loaded, state_dir, threads, cases, mem_mb, lat_ms, as_json)
        return
    name, why = resolve_variant(loaded, variant, state_dir)
    model = EdgeModel.from_bundle(loaded, name, threads)
    cohort = synthetic_cohort(loaded)
    result = profile(model, cohort.iter_cases(PROFILE_FIRST_CASE, cases + WARMUP_CASES), mem_mb, lat_ms)
    report = {"bundle": str(bundle), "model_version": loaded.model_version, "variant": name, "variant_reason": why,
              "threads": threads, **result.to_dict()}
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        lat, model_ms = report["latency_ms"], report["model_ms"]
        click.echo(f"cases {report['cases']}  variant {name} ({why})  threads {threads}")
        click.echo(f"latency ms  p50 {lat['p50']:.1f}  p95 {lat['p95']:.1f}  p99 {lat['p99']:.1f}   budget {lat_ms:g} (p95)")
        click.echo(f"model ms    p50 {model_ms['p50']:.1f}  p95 {model_ms['p95']:.1f}  (encoders + head, without reading)")
        for stage, row in report["stages_ms"].items():
            click.echo(f"  {stage:<12} n={row['cases']:<4} p50 {row['p50']:.1f}  p95 {row['p95']:.1f}")
        for mods, row in report["latency_ms_by_modalities"].items():
            click.echo(f"  {mods:<26} n={row['cases']:<4} p50 {row['p50']:.1f}  p95 {row['p95']:.1f}")
        click.echo(f"peak RSS    {report['peak_rss_mb']:.1f} MB   budget {mem_mb:g} MB")
        click.echo("PASS" if result.passed else "OVER BUDGET")
    sys.exit(0 if result.passed else 1)


def _select(loaded: Bundle, state_dir: Path | None, threads: int, cases: int, mem_mb: float, lat_ms: float, as_json: bool) -> None:
    """Re-measure every variant on this PC and pin the choice (exit 1 when none meets every limit)."""
    manifest = loaded.manifest
    sel = manifest.get("selection") or {}
    variants = {v["name"]: v for v in manifest["variants"]}
    reference = float(sel.get("reference_val_auc", variants.get("fp32", {}).get("val_auc", 0.0)))
    tolerance = float(sel.get("tolerance", 0.005))
    measured, figures = [], {}
    for name, v in variants.items():
        files = {m: str(loaded.path(v["encoders"][m])) for m in MODALITIES}
        request = Request(files, str(loaded.path(manifest["head"]["file"])), manifest["preprocessing"], loaded.classes,
                          int(manifest["embedding_dim"]), int(manifest["synthetic"]["seed"]), int(manifest["synthetic"]["n_sites"]),
                          cases=cases, threads=threads)
        fig = measure(request)
        figures[name] = fig
        auc = float(v.get("val_auc", reference))
        measured.append(Measured(name, auc, fig["latency_ms"]["p95"], fig["model_ms"]["p95"], fig["peak_rss_mb"]))
        if not as_json:
            click.echo(f"{name:<30} model p95 {fig['model_ms']['p95']:6.1f} ms  case p95 {fig['latency_ms']['p95']:6.1f} ms"
                       f"  peak RSS {fig['peak_rss_mb']:6.1f} MB  val AUC {auc:.4f}")
    selection = choose(measured, reference, tolerance, mem_mb, lat_ms)
    state = state_dir or default_state_dir()
    pin = write_pin(state, loaded, selection.chosen, figures[selection.chosen])
    if as_json:
        click.echo(json.dumps({"chosen": selection.chosen, "ok": selection.ok, "reasons": selection.reasons,
                               "figures": figures, "pin": str(pin)}, indent=2))
    else:
        click.echo(selection.message())
        click.echo(f"pinned {selection.chosen} in {pin}")
    sys.exit(0 if selection.ok else 1)


if __name__ == "__main__":
    main()
