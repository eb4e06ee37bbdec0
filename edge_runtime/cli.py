"""`edge-run`: the clinic's command line. Thin over the library; exit 0 ok, 1 over budget, 2 bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .bundle import Bundle, default_public_key_path, load_bundle
from .cliutil import handle_errors
from .errors import BadInput, BundleError
from .keys import load_public_key
from .manifest import load_case, read_manifest
from .model import EdgeModel
from .profiling import WARMUP_CASES, profile
from .synthetic import InputSpec, SynthConfig, SyntheticCohort, parse_case_id
from .units import parse_duration_ms, parse_size_mb

PROFILE_FIRST_CASE = 2_000_000  # synthetic profile cases, disjoint from training and test indices


def bundle_options(fn):
    fn = click.option("--threads", default=2, show_default=True, type=click.IntRange(1, 64), help="ONNX Runtime intra-op threads.")(fn)
    fn = click.option("--variant", default=None, help="Encoder variant from the bundle (default: the bundle's choice).")(fn)
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
def infer(bundle: Path, trusted_key: Path | None, variant: str | None, threads: int, manifest: Path | None,
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
    model = EdgeModel.from_bundle(loaded, variant, threads)
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
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def profile_cmd(bundle: Path, trusted_key: Path | None, variant: str | None, threads: int, cases: int,
                mem_budget: str | None, latency_budget: str | None, as_json: bool) -> None:
    """Latency p50/p95/p99 and whole-process peak RSS against the budgets; exit 1 when over."""
    # Parse budgets before any work, so a typo costs nothing.
    mem_mb = parse_size_mb(mem_budget) if mem_budget else None
    lat_ms = parse_duration_ms(latency_budget) if latency_budget else None
    loaded = open_bundle(bundle, trusted_key)
    budgets = loaded.manifest.get("budgets", {})
    mem_mb = mem_mb or float(budgets.get("mem_mb", 1800.0))
    lat_ms = lat_ms or float(budgets.get("latency_ms", 200.0))
    model = EdgeModel.from_bundle(loaded, variant, threads)
    cohort = synthetic_cohort(loaded)
    result = profile(model, cohort.iter_cases(PROFILE_FIRST_CASE, cases + WARMUP_CASES), mem_mb, lat_ms)
    report = {"bundle": str(bundle), "model_version": loaded.model_version, "variant": variant or loaded.manifest["default_variant"],
              "threads": threads, **result.to_dict()}
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        lat = report["latency_ms"]
        click.echo(f"cases {report['cases']}  variant {report['variant']}  threads {threads}")
        click.echo(f"latency ms  p50 {lat['p50']:.1f}  p95 {lat['p95']:.1f}  p99 {lat['p99']:.1f}   budget {lat_ms:g} (p95)")
        for mods, row in report["latency_ms_by_modalities"].items():
            click.echo(f"  {mods:<26} n={row['cases']:<4} p50 {row['p50']:.1f}  p95 {row['p95']:.1f}")
        click.echo(f"peak RSS    {report['peak_rss_mb']:.1f} MB   budget {mem_mb:g} MB")
        click.echo("PASS" if result.passed else "OVER BUDGET")
    sys.exit(0 if result.passed else 1)


if __name__ == "__main__":
    main()
