"""`edge-run`: the clinic's command line. Thin over the library; exit 0 ok, 1 over budget, 2 bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .bundle import Bundle
from .cliutil import handle_errors
from .errors import BadInput, BudgetSpent, BundleError
from .fsutil import sweep_temps
from .manifest import load_case, read_manifest
from .profiling import profile, profile_cases
from .state import ClinicState, bundle_head_key, check_name
from .synthetic import InputSpec, SynthConfig, SyntheticCohort, parse_case_id
from .units import parse_duration_ms, parse_size_mb
from .variants import default_state_dir

TRUSTED_KEY_HELP = ("Ed25519 public key of the bundle signer [default: for a version pulled by `sync`, the server key pinned "
                    "at enrollment; else BUNDLE.pub next to the bundle, which must be the signer key pinned in the state "
                    "folder at its first verified use].")
EPSILON_HELP = "Privacy budget of this dataset over the clinic's whole participation [default: the ledger's; 0.5 for a new dataset]."
DELTA_HELP = "Privacy delta [default: the ledger's; 1e-5 for a new dataset]."
ROUNDS_HELP = ("Rounds the lifetime budget is split over, this one included (1: spend what is left now) "
               "[default: the bundle's plan, the same for every clinic of a federation].")


def state_option(fn):
    """--state, resolved once: the option, else $EDGE_RUN_STATE, else ~/.dwfl-edge."""
    return click.option(
        "--state", "state_dir", type=click.Path(path_type=Path), default=None, envvar="EDGE_RUN_STATE",
        callback=lambda _ctx, _param, value: Path(value).expanduser() if value else default_state_dir(),
        help="Clinic state folder: privacy ledger, embedding cache, fine-tuned heads, outbox, variant pin [default: ~/.dwfl-edge].",
    )(fn)


def bundle_options(fn):
    fn = click.option("--threads", default=2, show_default=True, type=click.IntRange(1, 64), help="ONNX Runtime intra-op threads.")(fn)
    fn = click.option("--variant", default=None,
                      help="Encoder variant from the bundle [default: pinned by `profile --select`, else the export's choice for this CPU].")(fn)
    fn = state_option(fn)
    fn = click.option(
        "--trusted-key", type=click.Path(path_type=Path), default=None, envvar="EDGE_RUN_TRUSTED_KEY",
        help=TRUSTED_KEY_HELP,
    )(fn)
    fn = click.option("--bundle", required=True, type=click.Path(path_type=Path), help="Bundle directory.")(fn)
    return fn


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
def infer(bundle: Path, trusted_key: Path | None, state_dir: Path, variant: str | None, threads: int, manifest: Path | None,
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
    state = ClinicState(state_dir)
    loaded = state.open_bundle(bundle, trusted_key)
    model = state.model_for(loaded, variant, threads)
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
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="Write a latency histogram with the budget line to this PNG (needs matplotlib: pip install '.[plot]').")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def profile_cmd(bundle: Path, trusted_key: Path | None, state_dir: Path, variant: str | None, threads: int,
                cases: int, mem_budget: str | None, latency_budget: str | None, select_variant: bool, plot_path: Path | None,
                as_json: bool) -> None:
    """Latency p50/p95/p99 (whole case and model alone) and whole-process peak RSS against the
    budgets; exit 1 when over. With --select: measure all variants and pin the best here."""
    # Parse budgets before any work, so a typo costs nothing.
    mem_mb = parse_size_mb(mem_budget) if mem_budget else None
    lat_ms = parse_duration_ms(latency_budget) if latency_budget else None
    state = ClinicState(state_dir)
    loaded = state.open_bundle(bundle, trusted_key)
    budgets = loaded.manifest.get("budgets", {})
    mem_mb = mem_mb or float(budgets.get("mem_mb", 1800.0))
    lat_ms = lat_ms or float(budgets.get("latency_ms", 200.0))
    if select_variant:
        _select(loaded, state, threads=threads, cases=cases, mem_mb=mem_mb, lat_ms=lat_ms, as_json=as_json)
        return
    model = state.model_for(loaded, variant, threads)
    name, why = model.variant, model.variant_reason
    cohort = synthetic_cohort(loaded)
    if plot_path is not None:
        _check_can_plot(plot_path)
    result = profile(model, profile_cases(cohort, cases), mem_mb, lat_ms)
    report = {"bundle": str(bundle), "model_version": loaded.model_version, "variant": name, "variant_reason": why,
              "threads": threads, **result.to_dict()}
    if plot_path is not None:
        report["plot"] = str(_plot_latency(result, name, plot_path))
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


def _check_can_plot(path: Path) -> None:
    """Before the profile runs: a missing matplotlib or output folder costs nothing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise BadInput(f"{path}: --plot needs matplotlib (pip install 'dwfl-edge[plot]' or 'matplotlib')") from exc
    if not path.parent.is_dir():
        raise BadInput(f"{path}: folder {path.parent} does not exist")


def _plot_latency(result, variant: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(result.latencies_ms, bins=30, color="tab:blue", alpha=0.8, label="whole case")
    if result.model_ms:
        ax.hist(result.model_ms, bins=30, color="tab:green", alpha=0.6, label="model only (encoders + head)")
    ax.axvline(result.latency_budget_ms, color="red", ls="--", label=f"budget {result.latency_budget_ms:g} ms (p95)")
    ax.axvline(result.latency["p95"], color="black", ls=":", label=f"p95 {result.latency['p95']:.1f} ms")
    ax.set_xscale("log")
    ax.set_xlabel("latency per case, ms (log)")
    ax.set_ylabel("cases")
    ax.set_title(f"edge-run profile: {variant}, {len(result.latencies_ms)} cases, peak RSS {result.peak_rss_mb:.0f} MB")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path


def _select(loaded: Bundle, state: ClinicState, *, threads: int, cases: int, mem_mb: float, lat_ms: float, as_json: bool) -> None:
    """Re-measure every variant on this PC and pin the choice (exit 1 when none meets every limit)."""
    from .measure import MeasureSpec, bundle_candidates, measure_variants

    def show(c, fig: dict) -> None:
        if not as_json:
            click.echo(f"{c.name:<30} model p95 {fig['model_ms']['p95']:6.1f} ms  case p95 {fig['latency_ms']['p95']:6.1f} ms"
                       f"  peak RSS {fig['peak_rss_mb']:6.1f} MB  val AUC {c.val_auc:.4f}")

    candidates, reference, tolerance = bundle_candidates(loaded)
    result = measure_variants(MeasureSpec.of_bundle(loaded, cases=cases, threads=threads), candidates, reference_auc=reference,
                              tolerance=tolerance, mem_budget_mb=mem_mb, latency_budget_ms=lat_ms, on_measured=show)
    selection, figures = result.selection, result.figures
    pin = state.write_pin(loaded, selection.chosen, figures[selection.chosen])
    if as_json:
        click.echo(json.dumps({"chosen": selection.chosen, "ok": selection.ok, "reasons": selection.reasons,
                               "figures": figures, "pin": str(pin)}, indent=2))
    else:
        click.echo(selection.message())
        click.echo(f"pinned {selection.chosen} in {pin}")
    sys.exit(0 if selection.ok else 1)


@main.command()
@bundle_options
@click.option("--manifest", required=True, type=click.Path(path_type=Path), help="Labelled case manifest (CSV or JSONL).")
@click.option("--epsilon", default=None, type=float, help=EPSILON_HELP)
@click.option("--delta", default=None, type=float, help=DELTA_HELP)
@click.option("--dataset", default="default", show_default=True, help="Dataset name: one privacy ledger per clinic and dataset.")
@click.option("--round-epsilon", default=None, type=float,
              help="Spend at most this much in this round [default: the plan's share of what is left, see --rounds].")
@click.option("--rounds", default=None, type=click.IntRange(1, 1000), help=ROUNDS_HELP)
@click.option("--epochs", default=None, type=float, help="Planned passes over the training cases per round [default: the bundle's plan].")
@click.option("--batch-size", default=None, type=click.IntRange(1, 1_000_000), help="Expected (Poisson) batch size [default: the bundle's plan].")
@click.option("--clip", default=None, type=float, help="Per-example gradient norm bound C [default: the bundle's plan].")
@click.option("--lr", default=None, type=float, help="Learning rate [default: the bundle's plan].")
@click.option("--tolerance", default=0.02, show_default=True, type=float, help="Largest validation AUC drop for the new head to go live.")
@click.option("--cache-mb", default=512.0, show_default=True, type=float, help="Embedding cache size bound.")
@click.option("--seed", default=None, type=int, hidden=True, help="Tests only: fixed noise (never in production).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def finetune(bundle: Path, trusted_key: Path | None, variant: str | None, threads: int, state_dir: Path, manifest: Path,
             epsilon: float, delta: float, dataset: str, round_epsilon: float | None, rounds: int | None, epochs: float | None,
             batch_size: int | None, clip: float | None, lr: float | None, tolerance: float, cache_mb: float, seed: int | None,
             as_json: bool) -> None:
    """Fine-tune the head on local labelled cases with DP-SGD, numpy only.

    Frozen encoders embed each case once into a cache in the state folder. The privacy ledger plans
    sigma and steps to fit what is left of the budget and records the charge (fsynced) before any
    update is written; past the budget it refuses (exit 1). The update (delta + metadata) goes to
    STATE/outbox; the new head goes live only if the local validation AUC holds (see rollback).
    """
    from .finetune.run import FinetuneOptions
    from .finetune.run import finetune as run_finetune

    opts = FinetuneOptions(epsilon=epsilon, delta=delta, dataset=check_name(dataset, "dataset"), round_epsilon=round_epsilon,
                           rounds=rounds, epochs=epochs, batch_size=batch_size, clip=clip, lr=lr, tolerance=tolerance, seed=seed,
                           cache_mb=cache_mb, variant=variant, threads=threads)
    opts.check()
    cases = read_manifest(manifest)
    state = ClinicState(state_dir)
    loaded = state.open_bundle(bundle, trusted_key, pin=True)
    sweep_temps(state.root)  # leftovers of a run that was killed
    report = run_finetune(loaded, cases, state, opts)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    v, p = report["validation"], report["privacy"]
    c = report["cases"]
    click.echo(f"cases: {c['train']} training, {c['validation']} validation, {c['rejected']} rejected  (variant {report['variant']})")
    click.echo(f"validation AUC: start {v['auc_start']:.3f}  active {v['auc_active_before']:.3f}  new {v['auc_new']:.3f}  "
               f"-> {'ACTIVATED' if report['activated'] else 'kept the active head (AUC fell more than the tolerance)'}")
    click.echo(f"DP-SGD: sigma {p['noise_multiplier']:.3f}  q {p['sampling_rate']:.4f}  steps {p['steps']}  C {p['clip']:g}")
    click.echo(f"privacy: epsilon this round {p['epsilon_round']:.4f}, spent {p['epsilon_spent']:.4f} of {p['epsilon_total']:g} "
               f"(left {p['epsilon_left']:.4f}, delta {p['delta']:g})")
    click.echo(f"update: {report['update']}")


@main.command()
@click.option("--bundle", required=True, type=click.Path(path_type=Path), help="Bundle directory.")
@click.option("--trusted-key", type=click.Path(path_type=Path), default=None, envvar="EDGE_RUN_TRUSTED_KEY", help=TRUSTED_KEY_HELP)
@state_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def rollback(bundle: Path, trusted_key: Path | None, state_dir: Path, as_json: bool) -> None:
    """Put the previous head back in force for this bundle (the bundle's own after the first fine-tune).
    Exit 1 when no fine-tuned head is active."""
    state = ClinicState(state_dir)
    now = state.rollback(state.open_bundle(bundle, trusted_key))
    report = {"active": now["round_id"] if now else None, "head": now["file"] if now else "bundle"}
    click.echo(json.dumps(report) if as_json else f"active head: {report['active'] or 'the bundle head'}")


@main.command()
@state_option
@click.option("--bundle", type=click.Path(path_type=Path), default=None, help="Also show which head is active for this bundle.")
@click.option("--trusted-key", type=click.Path(path_type=Path), default=None, envvar="EDGE_RUN_TRUSTED_KEY", help=TRUSTED_KEY_HELP)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def status(state_dir: Path, bundle: Path | None, trusted_key: Path | None, as_json: bool) -> None:
    """Privacy budget spent and left per dataset (recomputed from the ledger's events, at the delta and
    budget the ledger recorded), active head, pulled versions with their local validation AUC (active,
    replaced or held back), outbox."""
    st = ClinicState(state_dir)
    report: dict = {"state": str(st.root), "clinic": None, "datasets": [], "outbox": []}
    if st.clinic_file.exists():
        report["clinic"] = st.clinic_id
        report["datasets"] = st.privacy_summaries()
        report["outbox"] = [p.name for p in st.outbox()]
    report["versions"] = st.version_log()
    if bundle is not None:
        loaded = st.open_bundle(bundle, trusted_key)
        head = st.active_head(loaded)
        report["active_head"] = head.round_id
        report["head"] = head.source
        report["bundle_head"] = bundle_head_key(loaded)[:16] if head.entry else None
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"state {report['state']}  clinic {report['clinic'] or '(none yet)'}")
    for d in report["datasets"]:
        click.echo(f"dataset {d['dataset']}: epsilon spent {d['epsilon_spent']:.4f}, left {d['epsilon_left']:.4f} of "
                   f"{d['epsilon_total']:g} (delta {d['delta']:g}, {d['rounds']} rounds)")
    if not report["datasets"]:
        click.echo("no privacy budget spent yet")
    if bundle is not None:
        click.echo(f"active head: {report['active_head'] or 'the bundle head'}")
    for v in report["versions"]:
        auc = f"local validation AUC {v['val_auc']:.4f}" if v.get("scored") else "not scored"
        click.echo(f"version {v['version']} ({v['model_version']}): {v['status']}, {auc}" + (f" ({v['reason']})" if v.get("reason") else ""))
    click.echo(f"outbox: {len(report['outbox'])} update(s)")


@main.command()
@click.option("--bundle", type=click.Path(path_type=Path), default=None, help="Bundle to check this PC against.")
@click.option("--trusted-key", type=click.Path(path_type=Path), default=None, envvar="EDGE_RUN_TRUSTED_KEY", help=TRUSTED_KEY_HELP)
@state_option
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1, 64), help="ONNX Runtime intra-op threads.")
@click.option("--cases", default=20, show_default=True, type=click.IntRange(3, 10_000), help="Cases of the short profile.")
@click.option("--mem-budget", default=None, help="Peak RSS budget, e.g. 1.8GB [default: the bundle's].")
@click.option("--latency-budget", default=None, help="p95 latency budget per case, e.g. 200ms [default: the bundle's].")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def doctor(bundle: Path | None, trusted_key: Path | None, state_dir: Path, threads: int, cases: int,
           mem_budget: str | None, latency_budget: str | None, as_json: bool) -> None:
    """Is this PC fit? CPU features, cores, RAM, disk, ONNX Runtime, the variant that fits, a short
    profile against the budgets, the privacy budget left. Exit 1 when the PC cannot meet the budgets."""
    from .doctor import Report, machine_checks, privacy_checks

    report = Report()
    mem_mb, lat_ms = 1800.0, 200.0  # DESIGN's clinic budgets, unless the bundle or options say otherwise
    state = ClinicState(state_dir)
    loaded = state.open_bundle(bundle, trusted_key) if bundle is not None else None
    if loaded is not None:
        budgets = loaded.manifest.get("budgets", {})
        mem_mb, lat_ms = float(budgets.get("mem_mb", mem_mb)), float(budgets.get("latency_ms", lat_ms))
    mem_mb = parse_size_mb(mem_budget) if mem_budget else mem_mb
    lat_ms = parse_duration_ms(latency_budget) if latency_budget else lat_ms
    machine_checks(report, state_dir, mem_mb)
    if loaded is not None:
        model = state.model_for(loaded, None, threads)
        name = model.variant
        report.add("variant", name, True, model.variant_reason)
        result = profile(model, profile_cases(synthetic_cohort(loaded), cases), mem_mb, lat_ms)
        lat = result.latency
        report.facts["profile"] = {"variant": name, **result.to_dict()}
        report.add("latency p95", f"{lat['p95']:.1f} ms ({cases} cases, {threads} threads)", lat["p95"] <= lat_ms, f"budget {lat_ms:g} ms")
        report.add("peak memory", f"{result.peak_rss_mb:.1f} MB", result.peak_rss_mb <= mem_mb, f"budget {mem_mb:g} MB")
    privacy_checks(report, state_dir)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="edge-run doctor" + (f": {bundle}" if bundle else ""))
        for col in ("check", "value", "", "detail"):
            table.add_column(col)
        for c in report.checks:
            table.add_row(c.name, c.value, "[green]ok[/green]" if c.ok else "[red]FAIL[/red]", c.detail)
        Console().print(table)
        click.echo("this PC is fit for the bundle" if report.ok else "this PC cannot meet the budgets (see FAIL above)")
    sys.exit(0 if report.ok else 1)


@main.command()
@state_option
@click.option("--server", "url", required=True, help="Server URL, e.g. https://fl.example.org (TLS in production).")
@click.option("--token", required=True, envvar="EDGE_RUN_TOKEN", help="One-time enrollment token from `edge-server token`.")
@click.option("--kem", default="mlkem768-x25519", show_default=True, type=click.Choice(["mlkem768-x25519", "x25519"]),
              help="HPKE KEM used to seal updates to the server.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def enroll(state_dir: Path, url: str, token: str, kem: str, as_json: bool) -> None:
    """Make this clinic's signing key, register it with the token and pin the server key the token names."""
    from .sync.client import enroll as do_enroll

    report = do_enroll(ClinicState(state_dir), url, token, kem)
    click.echo(json.dumps(report) if as_json else f"enrolled as {report['clinic']}; server key {report['server_key_id'][:16]}… pinned")


@main.command()
@state_option
@click.option("--server", "url", default=None, help="Server URL [default: the one enrolled with].")
@click.option("--manifest", type=click.Path(path_type=Path), default=None,
              help="Labelled case manifest: fine-tune on it when the open round has nothing from this clinic yet.")
@click.option("--epsilon", default=None, type=float, help=EPSILON_HELP)
@click.option("--delta", default=None, type=float, help=DELTA_HELP)
@click.option("--round-epsilon", default=None, type=float,
              help="Spend at most this much per round [default: the plan's share of what is left, see --rounds].")
@click.option("--dataset", default="default", show_default=True, help="Dataset name (one privacy ledger each).")
@click.option("--rounds", default=None, type=click.IntRange(1, 1000), help=ROUNDS_HELP)
@click.option("--epochs", default=None, type=float, help="Passes over the training cases per round [default: the bundle's plan].")
@click.option("--batch-size", default=None, type=click.IntRange(1, 1_000_000), help="[default: the bundle's plan]")
@click.option("--lr", default=None, type=float, help="[default: the bundle's plan]")
@click.option("--tolerance", default=0.02, show_default=True, type=float,
              help="Largest validation AUC drop for a new head or a pulled version to go live.")
@click.option("--retries", default=5, show_default=True, type=click.IntRange(0, 100), help="Tries after the first, with exponential backoff.")
@click.option("--backoff", default=1.0, show_default=True, type=click.FloatRange(0, 600), help="First wait between tries (seconds).")
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(0.1, 3600), help="Seconds per HTTP request.")
@click.option("--seed", default=None, type=int, hidden=True, help="Tests only: fixed noise (never in production).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def sync(state_dir: Path, url: str | None, manifest: Path | None, epsilon: float | None, delta: float | None, round_epsilon: float | None,
         dataset: str, rounds: int | None, epochs: float | None, batch_size: int | None, lr: float | None, tolerance: float,
         retries: int, backoff: float, timeout: float, seed: int | None, as_json: bool) -> None:
    """Upload pending updates, pull the latest global model (verified), and with --manifest fine-tune
    with DP and upload a sealed, signed update for the open round. Made for cron / systemd timers /
    Task Scheduler: safe to run at any time, does nothing twice. Exit 1 when the server refused."""
    from .finetune.run import FinetuneOptions
    from .finetune.run import finetune as run_finetune
    from .sync.activation import decide
    from .sync.client import Client, contributed

    cases = read_manifest(manifest) if manifest is not None else None
    opts = FinetuneOptions(epsilon=epsilon, delta=delta, dataset=check_name(dataset, "dataset"), round_epsilon=round_epsilon,
                           rounds=rounds, epochs=epochs, batch_size=batch_size, lr=lr, tolerance=tolerance, seed=seed)
    opts.check()
    state = ClinicState(state_dir)
    client = Client(state, url, retries, backoff, timeout)
    sweep_temps(state.root)  # leftovers of a run that was killed
    report: dict = {"clinic": client.config.clinic, "uploads": client.upload_pending()}
    status = client.get_json("/v1/model")
    bundle = client.pull(int(status["version"]))
    report.update(version=int(status["version"]), model_version=bundle.model_version, bundle=str(bundle.root))
    report["activation"] = decide(client, bundle, int(status["version"]), cases, opts)  # scored on the local split first
    rnd = status.get("round") or {}
    report["round"] = rnd.get("id")
    if cases is None:
        report["finetune"] = "skipped (no --manifest)"
    elif rnd.get("state") != "open" or int(rnd.get("base_version", -1)) != int(status["version"]):
        report["finetune"] = "skipped (no open round on this version)"
    elif (done := contributed(state, int(rnd["id"]))) is not None:
        report["finetune"] = f"skipped (already sent {done} for round {rnd['id']})"
    else:
        made = client.unsent_update(bundle)  # made on this version by a run that died before queueing it
        if made is not None:
            report["finetune"] = f"skipped (update {made.stem} was made on this version already; queued, no new privacy cost)"
        else:
            try:
                ft = run_finetune(bundle, cases, state, opts)
            except BudgetSpent as exc:  # the clinic keeps pulling and scoring versions; it sends nothing more
                ft, report["finetune"] = None, f"skipped ({exc})"
            if ft is not None:
                made = Path(ft["update"])
                report["finetune"] = {"update_id": ft["update_id"], "validation": ft["validation"], "privacy": ft["privacy"]}
        if made is not None:
            client.queue(made, int(rnd["id"]), int(status["version"]))
            report["uploads"] += client.upload_pending()
    refused = [u for u in report["uploads"] if u.get("status") == "refused"]
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"clinic {report['clinic']}: model version {report['version']} ({report['model_version']}), round {report['round']}")
        act = report["activation"]
        auc = f"local validation AUC {act['val_auc']:.4f}" if act.get("scored") else "not scored"
        click.echo(f"version {act['version']}: {act['status']} ({auc}" + (f"; in use v{act['in_use_version']}: {act['in_use_val_auc']:.4f}"
                                                                        if "in_use_val_auc" in act else "") + ")"
                   + (f": {act['reason']}" if act.get("reason") else ""))
        ft = report["finetune"]
        click.echo(f"fine-tune: {ft if isinstance(ft, str) else ft['update_id']}")
        for u in report["uploads"]:
            click.echo(f"upload {u['update_id']}: {u['status']}" + (f" ({u.get('reason')})" if u["status"] == "refused" else ""))
    sys.exit(1 if refused else 0)


if __name__ == "__main__":
    main()
