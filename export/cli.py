"""`edge-export`: the server-side export pipeline. Thin over the library; exit 2 on bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edge_runtime.cliutil import handle_errors
from edge_runtime.errors import BadInput
from federation.aggregation import DEFAULT_STRATEGY, STRATEGIES

from .config import CONFIGS, TEST_START, VARIANT_NAMES, get_config

STRATEGY_NAMES = tuple(STRATEGIES)


def check_device(name: str) -> str:
    """A torch device that exists here, or a clear refusal (no silent fall-back to the CPU)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise BadInput(f"--device {name!r} is not a torch device") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {name}: no CUDA device is available on this machine")
    return str(device)


@click.group()
@click.version_option(package_name="dwfl-edge")
def main() -> None:
    """dwfl-edge export pipeline: train, distill, export to ONNX, quantize, sign bundles."""


def _identity_options(fn):
    fn = click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of data, init and training.")(fn)
    return click.option("--config", "config_name", default="tiny", show_default=True, type=click.Choice(sorted(CONFIGS)),
                        help="Model/training size.")(fn)


def _work_option(fn):
    return click.option("--work", required=True, type=click.Path(path_type=Path),
                        help="Work folder of the pipeline's stages (OUT/work for `pipeline --out OUT`).")(fn)


def _device_options(fn):
    fn = click.option("--device", default="cpu", show_default=True, help="torch device for training (cpu, cuda, cuda:1).")(fn)
    return click.option("--threads", default=2, show_default=True, type=click.IntRange(1, 256), help="torch threads.")(fn)


def _recipe_options(fn):
    """The quantization recipe: what `quantize` takes, and `pipeline` passes on to it."""
    fn = click.option("--variants", default=None,
                      help="Comma-separated candidates to build and measure (fp32 is always among them) [default: all: "
                           + ", ".join(VARIANT_NAMES) + "].")(fn)
    fn = click.option("--tolerance", default=0.005, show_default=True, type=click.FloatRange(0.0, 1.0),
                      help="AUC drop allowed against the FP32 student.")(fn)
    fn = click.option("--latency-budget", default="200ms", show_default=True, help="p95 latency budget per case.")(fn)
    return click.option("--mem-budget", default="1.8GB", show_default=True, help="Whole-process peak RSS budget of the clinic.")(fn)


def _bundle_options(fn):
    fn = click.option("--model-version", default="1", show_default=True, help="Version string written into the bundle.")(fn)
    return click.option("--signing-key", type=click.Path(path_type=Path), default=None,
                        help="Ed25519 private key (PEM). Without it OUT/signing_key.pem is used when an earlier run made it, "
                             "else a new key is made and saved there (0600).")(fn)


def _json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (logs go to stderr).")(fn)


def _recipe(mem_budget: str, latency_budget: str, tolerance: float, variants: str | None, threads: int):
    from edge_runtime.units import parse_duration_ms, parse_size_mb

    from .stages import QuantizeOptions

    names = tuple(n.strip() for n in variants.split(",") if n.strip()) if variants is not None else VARIANT_NAMES
    budgets = {"mem_mb": parse_size_mb(mem_budget), "latency_ms": parse_duration_ms(latency_budget)}
    return QuantizeOptions(tolerance, budgets, threads, names).checked()


def _log(as_json: bool):
    return (lambda msg: click.echo(msg, err=True)) if as_json else click.echo


def _work(work: Path, config_name: str, seed: int):
    from .work import Identity, Work

    cfg = get_config(config_name)
    return Work(work, Identity.of(cfg, seed)), cfg


def _stage_done(record: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(record, indent=2))
    else:
        click.echo(f"{record['command']}: done in {record['seconds']:.1f} s; {len(record['outputs'])} file(s) recorded")


def _report(result, out: Path, as_json: bool) -> None:
    """What `pipeline` and `bundle` print; exit 1 when no candidate met every limit (the best was written)."""
    from .report import table_lines

    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo("")
        for line in table_lines(result.candidates, result.selection["chosen"]):
            click.echo(line)
        click.echo("")
        click.echo(f"{'model (test cases)':<22}{'AUC':>8}")
        for name, auc in result.auc.items():
            click.echo(f"{name:<22}{auc:>8.4f}")
        click.echo(f"parameters: teacher {result.parameters['teacher']:,}  student {result.parameters['student']:,}"
                   f"   FLOPs per case: teacher {result.flops['teacher'] / 1e9:.2f} G  student {result.flops['student'] / 1e9:.2f} G")
        click.echo(f"bundle: {result.bundle_dir}   trusted key: {result.public_key}   report: {out / 'report.json'}")
    if not result.ok:
        click.echo(f"error: {out}: {result.selection['message']}", err=True)
        sys.exit(1)
    click.echo(result.selection["message"], err=as_json)


@main.command()
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Output folder (bundle/, bundle.pub, report.json; the stages' work folder OUT/work).")
@_identity_options
@_bundle_options
@_device_options
@click.option("--init-checkpoint", type=click.Path(path_type=Path), default=None,
              help="Local pretrained teacher weights (matching tensors are loaded; nothing is downloaded).")
@click.option("--teacher-state", type=click.Path(path_type=Path), default=None,
              help="A hospital's state folder (edge-export enroll): distill the teacher the hospitals trained over the network "
                   "(the federation's latest version, pulled and verified, with this hospital's own normalisation layers) "
                   "instead of training one here.")
@_recipe_options
@_json_option
@handle_errors
def pipeline(out: Path, config_name: str, seed: int, signing_key: Path | None, model_version: str, threads: int,
             device: str, init_checkpoint: Path | None, mem_budget: str, latency_budget: str, tolerance: float,
             variants: str | None, as_json: bool, teacher_state: Path | None = None) -> None:
    """Every stage in order: train-teacher (federated) -> distill -> export (ONNX) -> quantize (INT8
    candidates, measured here with --threads) -> bundle (signed), over OUT/work. Exit 1 when no
    candidate meets accuracy and both budgets (the best one is still written, and the report says
    which limit failed). Rerun `quantize --work OUT/work` and `bundle` to change the recipe without training."""
    import torch  # late: `--help` stays fast

    from .pipeline import run_pipeline

    recipe = _recipe(mem_budget, latency_budget, tolerance, variants, threads)
    if teacher_state is not None and init_checkpoint is not None:
        raise BadInput("--teacher-state and --init-checkpoint both choose the teacher: give one")
    network = None
    if teacher_state is not None:
        from .hospital import Hospital

        version, folder, norms = Hospital(teacher_state).latest()
        network = (folder, norms)
        _log(as_json)(f"teacher: federation version {version} from {teacher_state}")
    torch.set_num_threads(threads)
    result = run_pipeline(out, get_config(config_name), seed=seed, signing_key=signing_key, model_version=model_version,
                          log=_log(as_json), device=check_device(device), init_checkpoint=init_checkpoint, budgets=recipe.budgets,
                          tolerance=recipe.tolerance, threads=threads, variants=recipe.variants, network_teacher=network)
    _report(result, out, as_json)


@main.command()
@_work_option
@_identity_options
@_device_options
@_json_option
@handle_errors
def distill(work: Path, config_name: str, seed: int, threads: int, device: str, as_json: bool) -> None:
    """Distill the student from WORK/teacher (made by `train-teacher --work`) into WORK/student.pt."""
    import torch

    from .stages import distill_stage

    w, cfg = _work(work, config_name, seed)
    w.require("distill")  # before torch's threads and device: a wrong folder costs nothing
    device = check_device(device)
    torch.set_num_threads(threads)
    _stage_done(distill_stage(w, cfg, device=device, log=_log(as_json)), as_json)


@main.command("export")
@_work_option
@_identity_options
@_json_option
@handle_errors
def export_cmd(work: Path, config_name: str, seed: int, as_json: bool) -> None:
    """WORK/student.pt -> ONNX encoders and head in WORK/onnx (parity with torch checked), head.npz."""
    from .stages import export_stage

    w, cfg = _work(work, config_name, seed)
    _stage_done(export_stage(w, cfg, log=_log(as_json)), as_json)


@main.command()
@_work_option
@_identity_options
@_recipe_options
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1, 256),
              help="ONNX Runtime threads the candidates are measured with.")
@_json_option
@handle_errors
def quantize(work: Path, config_name: str, seed: int, mem_budget: str, latency_budget: str, tolerance: float,
             variants: str | None, threads: int, as_json: bool) -> None:
    """Build the INT8 candidates from WORK/onnx, score them on validation cases, measure each in a
    fresh process here, choose (WORK/quantize, quantize.json). No training: rerun it with another
    recipe, then `bundle`. Exit 1 when no candidate meets every limit (`bundle` still writes the best)."""
    from .report import table_lines
    from .stages import quantize_stage

    recipe = _recipe(mem_budget, latency_budget, tolerance, variants, threads)
    w, cfg = _work(work, config_name, seed)
    record = quantize_stage(w, cfg, recipe, log=_log(as_json))
    selection = record["facts"]["selection"]
    if as_json:
        click.echo(json.dumps(record, indent=2))
    else:
        for line in table_lines(record["facts"]["variants"], selection["chosen"]):
            click.echo(line)
    if not selection["ok"]:
        click.echo(f"error: {work}: {selection['message']}", err=True)
        sys.exit(1)
    click.echo(selection["message"], err=as_json)


@main.command()
@_work_option
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Where bundle/, bundle.pub, report.json go [default: the folder holding --work, OUT for OUT/work].")
@_identity_options
@_bundle_options
@_json_option
@handle_errors
def bundle(work: Path, out: Path | None, config_name: str, seed: int, signing_key: Path | None, model_version: str,
           as_json: bool) -> None:
    """Sign the bundle from the work folder: every candidate `quantize` kept, its choice as default;
    the report and checkpoints.pt. Exit 1 when that choice fails a limit (the best is still written)."""
    from .stages import bundle_stage

    w, cfg = _work(work, config_name, seed)
    out = out if out is not None else Path(work).resolve().parent
    result = bundle_stage(w, cfg, out=out, signing_key=signing_key, model_version=model_version, log=_log(as_json))
    _report(result, out, as_json)


@main.command("train-teacher")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Simulation: folder for federated.pt and rounds.jsonl (the options below shape it).")
@click.option("--work", type=click.Path(path_type=Path), default=None,
              help="Pipeline stage instead: the teacher of --config and --seed, as `pipeline` trains it, into WORK/teacher "
                   "(federated.pt, rounds.jsonl) for `distill`; takes --config, --seed, --threads, --device, --init-checkpoint.")
@click.option("--json", "as_json", is_flag=True, help="With --work: print the stage's record as JSON.")
@click.option("--sites", default=4, show_default=True, type=click.IntRange(1, 64), help="Simulated sites (non-IID).")
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(1, 10_000), help="Federated rounds.")
@click.option("--strategy", default=DEFAULT_STRATEGY, show_default=True,
              type=click.Choice([*STRATEGY_NAMES, "centralized", "local"]),
              help="Aggregation rule, or a reference point: centralized (pooled data) / local (each site alone).")
@click.option("--strategy-option", "strategy_options", multiple=True, metavar="KEY=VALUE",
              help="A numeric setting of the strategy's constructor (repeatable), e.g. eta=2 for dwfl_mw, q=1 for qfedavg.")
@click.option("--config", "config_name", default="tiny", show_default=True, type=click.Choice(sorted(CONFIGS)), help="Model size.")
@click.option("--cases-per-site", default=120, show_default=True, type=click.IntRange(4, 1_000_000))
@click.option("--val-per-site", default=40, show_default=True, type=click.IntRange(2, 1_000_000))
@click.option("--test-per-site", default=0, show_default=True, type=click.IntRange(0, 1_000_000),
              help="Held-out cases per site; their AUC is printed at the end.")
@click.option("--local-epochs", default=1, show_default=True, type=click.IntRange(1, 1000))
@click.option("--beta", default=0.3, show_default=True, type=click.FloatRange(0.0, 1.0), help="DW-FL dynamic share.")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=1e-3), help="DW-FL temperature T.")
@click.option("--dynamic", default="loss", show_default=True, type=click.Choice(["loss", "relative"]),
              help="DW-FL dynamic term: softmax(L/T) (DESIGN §4) or softmax(L/(T mean L)).")
@click.option("--label-alpha", default=None, type=click.FloatRange(min=1e-3), help="Dirichlet label skew (smaller: more skew).")
@click.option("--local-norm/--shared-norm", default=True, show_default=True,
              help="FedBN: keep normalisation layers at each site, or average them like the rest.")
@click.option("--aux-weight", default=None, type=click.FloatRange(min=0.0),
              help="Weight of the auxiliary risk-score task (multi-task); 0 turns it off. Default: the config's.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--resume", is_flag=True, help="Continue after the last checkpointed round.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1, 256), help="torch threads.")
@click.option("--device", default="cpu", show_default=True, help="torch device (cpu, cuda, cuda:1).")
@click.option("--init-checkpoint", type=click.Path(path_type=Path), default=None,
              help="Local pretrained teacher weights (transfer learning; nothing is downloaded).")
@handle_errors
def train_teacher(out: Path | None, sites: int, rounds: int, strategy: str, config_name: str, cases_per_site: int,
                  val_per_site: int, test_per_site: int, local_epochs: int, beta: float, temperature: float, dynamic: str,
                  label_alpha: float | None, local_norm: bool, aux_weight: float | None, seed: int, resume: bool,
                  threads: int, device: str, init_checkpoint: Path | None, work: Path | None, as_json: bool,
                  strategy_options: tuple[str, ...] = ()) -> None:
    """Federated teacher training, simulated: each site streams only its own cases; per round the
    per-site validation AUC and aggregation weights are logged (OUT/rounds.jsonl) and checkpointed.
    With --work instead of --out: the pipeline's first stage, the same federation (DW-FL over the
    cohort's sites, as the config says) writing the same federated.pt, into WORK/teacher."""
    if (out is None) == (work is None):
        raise BadInput("train-teacher takes either --out (the simulation) or --work (the pipeline's teacher stage), one of them")
    if work is not None:
        _teacher_stage(work, config_name, seed, threads, device, init_checkpoint, as_json)
        return
    import torch

    from .federated import BASELINES, FederationSpec, run_baseline, run_federation

    torch.set_num_threads(threads)
    if init_checkpoint is not None and not init_checkpoint.is_file():
        raise BadInput(f"{init_checkpoint}: no such checkpoint file")
    cfg = get_config(config_name)
    if aux_weight is not None:
        cfg = cfg.with_train(aux_weight=aux_weight)
    spec = FederationSpec(sites=sites, rounds=rounds, strategy=strategy, local_epochs=local_epochs,
                          cases_per_site=cases_per_site, val_per_site=val_per_site, test_per_site=test_per_site,
                          beta=beta, temperature=temperature, dynamic=dynamic, label_alpha=label_alpha,
                          local_norm=local_norm, device=check_device(device), init_checkpoint=init_checkpoint,
                          strategy_options=parse_strategy_options(strategy_options))
    if strategy in BASELINES:
        result = run_baseline(out, cfg, spec, seed, click.echo)
        click.echo(f"{strategy}: validation AUC " + json.dumps(result["rounds"][-1]["val_auc"]))
    else:
        result = run_federation(out, cfg, spec, seed, resume, click.echo)
    if result["test_auc"]:
        click.echo("test AUC " + json.dumps(result["test_auc"]))


# train-teacher options that shape the simulation only; with --work the config decides them.
SIMULATION_ONLY = ("sites", "rounds", "strategy", "cases_per_site", "val_per_site", "test_per_site", "local_epochs", "beta",
                   "temperature", "dynamic", "label_alpha", "local_norm", "aux_weight", "resume", "strategy_options")


def parse_strategy_options(items: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    """'eta=2' -> (("eta", 2.0),); BadInput naming the item that is not KEY=NUMBER."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not key.strip().isidentifier() or number is None:
            raise BadInput(f"--strategy-option {item!r}: expected KEY=NUMBER, e.g. eta=2")
        out.append((key.strip(), number))
    return tuple(out)


def _teacher_stage(work: Path, config_name: str, seed: int, threads: int, device: str, init_checkpoint: Path | None,
                   as_json: bool) -> None:
    import torch

    from .stages import train_teacher_stage

    ctx = click.get_current_context()
    given = [n for n in SIMULATION_ONLY if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise BadInput(f"train-teacher --work: {flag} shapes the simulation (--out) only; the pipeline's teacher follows --config")
    w, cfg = _work(work, config_name, seed)
    device = check_device(device)
    torch.set_num_threads(threads)
    _stage_done(train_teacher_stage(w, cfg, device=device, init_checkpoint=init_checkpoint, log=_log(as_json)), as_json)


@main.command()
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the case files and manifest.csv.")
@click.option("--cases", default=20, show_default=True, type=click.IntRange(1, 1_000_000), help="Number of cases.")
@click.option("--sites", default=4, show_default=True, type=click.IntRange(1, 1000), help="Number of sites (non-IID).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Cohort seed (use the bundle's).")
@click.option("--config", "config_name", default="tiny", show_default=True, type=click.Choice(sorted(CONFIGS)), help="Input shapes.")
@click.option("--start", default=TEST_START, show_default=True, type=click.IntRange(min=0),
              help="First case index; the default lies outside the pipeline's training cases.")
@click.option("--ct-format", default="dicom", show_default=True, type=click.Choice(["dicom", "nifti"]), help="How CT is written.")
@click.option("--site", default=None, type=click.IntRange(min=0),
              help="Draw every case from this one site of the cohort (0 .. --sites - 1), e.g. one clinic's data [default: all sites].")
@click.option("--clinic-site", default=None, type=click.IntRange(0, 63),
              help="Cases of deployment clinic K: a primary-care site shifted from the training cohort (synthetic.deployment_site).")
@handle_errors
def synth(out: Path, cases: int, sites: int, seed: int, config_name: str, start: int, ct_format: str, site: int | None,
          clinic_site: int | None) -> None:
    """Write synthetic cases as real files (DICOM series / NIfTI, PNG tiles, CSV expression) + manifest."""
    from edge_runtime.synthetic import SynthConfig, SyntheticCohort

    from .synth_files import write_cohort

    cfg = get_config(config_name)
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out}: exists and is not a directory")
    if site is not None and site >= sites:
        raise BadInput(f"--site {site} does not exist: the cohort has sites 0 .. {sites - 1}")
    if site is not None and clinic_site is not None:
        raise BadInput("give --site (a site of the training cohort) or --clinic-site (a deployment clinic), not both")
    cohort = SyntheticCohort(SynthConfig(seed=seed, n_sites=sites, spec=cfg.input))
    if clinic_site is not None:
        site = cohort.add_deployment_site(0, clinic_site)
    manifest = write_cohort(cohort, out, start, cases, list(cfg.classes), ct_format, site)
    click.echo(f"wrote {cases} cases and {manifest}")


# ------------------------------------------------------------------ hospital tier (DESIGN §10)


@main.command("teacher-init")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the first global teacher's files.")
@click.option("--config", "config_name", default="tiny", show_default=True, type=click.Choice(sorted(CONFIGS)), help="Model size.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Initialisation (and cohort) seed.")
@click.option("--sites", default=4, show_default=True, type=click.IntRange(1, 64), help="Sites the preprocessing is fitted over.")
@click.option("--cases-per-site", default=120, show_default=True, type=click.IntRange(4, 1_000_000))
@click.option("--init-checkpoint", type=click.Path(path_type=Path), default=None,
              help="Local pretrained teacher weights to start the federation from (transfer learning).")
@click.option("--local-norm/--shared-norm", default=True, show_default=True, help="FedBN: normalisation layers stay at each hospital.")
@handle_errors
def teacher_init(out: Path, config_name: str, seed: int, sites: int, cases_per_site: int, init_checkpoint: Path | None,
                 local_norm: bool) -> None:
    """Write the first global teacher for `edge-server publish-teacher`."""
    from .hospital import teacher_init as init

    if init_checkpoint is not None and not init_checkpoint.is_file():
        raise BadInput(f"{init_checkpoint}: no such checkpoint file")
    done = init(out, config_name=config_name, seed=seed, sites=sites, cases_per_site=cases_per_site,
                init_checkpoint=init_checkpoint, local_norm=local_norm)
    click.echo(f"wrote {done['folder']}: {done['tensors']} shared tensors ({done['parameters']} parameters), "
               f"{done['local_tensors']} local normalisation tensors")


@main.command("enroll")
@click.option("--server", "url", required=True, help="Aggregation server URL, e.g. https://fl.example.org")
@click.option("--token", required=True, help="Hospital-tier token from `edge-server token --tier hospital`.")
@click.option("--state", required=True, type=click.Path(path_type=Path), help="The hospital's state folder.")
@handle_errors
def enroll_cmd(url: str, token: str, state: Path) -> None:
    """Enroll this hospital in the teacher federation: a fresh signing key, the server's keys pinned."""
    from .hospital import enroll

    done = enroll(state, url, token)
    click.echo(f"enrolled {done['clinic']} (hospital) with server key {done['server_key_id'][:16]}…; state {done['state']}")


@main.command("train-round")
@click.option("--state", required=True, type=click.Path(path_type=Path), help="The hospital's state folder (after `enroll`).")
@click.option("--manifest", type=click.Path(path_type=Path), default=None,
              help="The hospital's labelled cases (CSV/JSONL manifest of DICOM/NIfTI, tiles, expression files).")
@click.option("--synthetic-site", type=click.IntRange(min=0), default=None,
              help="Instead of --manifest: this site of the synthetic cohort (demo, tests).")
@click.option("--synthetic-sites", default=4, show_default=True, type=click.IntRange(1, 64))
@click.option("--cohort-seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--cases", default=120, show_default=True, type=click.IntRange(4, 1_000_000), help="Synthetic training cases.")
@click.option("--val-cases", default=40, show_default=True, type=click.IntRange(2, 1_000_000), help="Synthetic validation cases.")
@click.option("--device", default="cpu", show_default=True, help="torch device (cpu, cuda, cuda:1).")
@click.option("--init-checkpoint", type=click.Path(path_type=Path), default=None,
              help="Local pretrained teacher: its normalisation layers start this hospital's own (FedBN).")
@click.option("--seed", default=None, type=click.IntRange(min=0), help="Local training seed [default: from the hospital's name].")
@click.option("--epochs", default=1, show_default=True, type=click.IntRange(1, 1000), help="Local epochs per round.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1, 256), help="torch threads.")
@click.option("--dp", is_flag=True, help="Record-level DP-SGD (Opacus), charged to this hospital's privacy ledger before training.")
@click.option("--dp-epsilon", type=click.FloatRange(min=0, min_open=True), default=None,
              help="With --dp: the lifetime budget (first use; afterwards the ledger's own) [default: 0.5].")
@click.option("--dp-round-epsilon", type=click.FloatRange(min=0, min_open=True), default=None, help="With --dp: at most this per round.")
@click.option("--dp-delta", type=click.FloatRange(min=0, min_open=True, max=1e-3), default=None, help="With --dp [default: 1e-5].")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def train_round_cmd(state: Path, manifest: Path | None, synthetic_site: int | None, synthetic_sites: int, cohort_seed: int,
                    cases: int, val_cases: int, device: str, init_checkpoint: Path | None, seed: int | None, epochs: int,
                    threads: int, as_json: bool, dp: bool = False, dp_epsilon: float | None = None,
                    dp_round_epsilon: float | None = None, dp_delta: float | None = None) -> None:
    """One scheduled run: send what is pending, and if the open teacher round has nothing from this
    hospital, pull the global teacher, train on the hospital's cases, seal and upload the update."""
    import torch

    from .hospital import SyntheticSite, train_round

    if (manifest is None) == (synthetic_site is None):
        raise BadInput("train-round takes --manifest (the hospital's cases) or --synthetic-site, one of them")
    if synthetic_site is not None and synthetic_site >= synthetic_sites:
        raise BadInput(f"--synthetic-site {synthetic_site} does not exist: the cohort has sites 0 .. {synthetic_sites - 1}")
    if init_checkpoint is not None and not init_checkpoint.is_file():
        raise BadInput(f"{init_checkpoint}: no such checkpoint file")
    data = manifest if manifest is not None else SyntheticSite(synthetic_site, synthetic_sites, cohort_seed, cases, val_cases)
    if not dp and (dp_epsilon or dp_round_epsilon or dp_delta):
        raise BadInput("--dp-epsilon, --dp-round-epsilon and --dp-delta take --dp")
    dp_options = None
    if dp:
        from .hospital_dp import DPOptions

        dp_options = DPOptions(epsilon_total=dp_epsilon, delta=dp_delta, round_epsilon=dp_round_epsilon)
        if device != "cpu":
            raise BadInput("--dp runs on the CPU in this release (Opacus' per-case gradients were checked there)")
    torch.set_num_threads(threads)
    done = train_round(state, data, device=check_device(device), init_checkpoint=init_checkpoint, seed=seed, epochs=epochs, dp=dp_options,
                       log=(lambda m: click.echo(m, err=True)) if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(done, indent=2, default=str))
        return
    click.echo(done["status"] + (f": update {done['update']['update_id']} stored in round {done['update']['answer']['round']}, "
                                 f"{done['update']['chunks_sent']} chunk(s) sent" if done["status"] == "sent" else ""))


if __name__ == "__main__":
    main()
