"""`edge-export`: the server-side export pipeline. Thin over the library; exit 2 on bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edge_runtime.cliutil import handle_errors
from edge_runtime.errors import BadInput

from .config import CONFIGS, TEST_START, get_config


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


@main.command()
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder (bundle/, bundle.pub, report.json).")
@click.option("--config", "config_name", default="tiny", show_default=True, type=click.Choice(sorted(CONFIGS)), help="Model/training size.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of data, init and training.")
@click.option("--signing-key", type=click.Path(path_type=Path), default=None,
              help="Ed25519 private key (PEM). Without it a new key is made and saved as OUT/signing_key.pem (0600).")
@click.option("--model-version", default="1", show_default=True, help="Version string written into the bundle.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1, 256), help="torch threads.")
@click.option("--device", default="cpu", show_default=True, help="torch device for training (cpu, cuda, cuda:1).")
@click.option("--init-checkpoint", type=click.Path(path_type=Path), default=None,
              help="Local pretrained teacher weights (matching tensors are loaded; nothing is downloaded).")
@click.option("--mem-budget", default="1.8GB", show_default=True, help="Whole-process peak RSS budget of the clinic.")
@click.option("--latency-budget", default="200ms", show_default=True, help="p95 latency budget per full case.")
@click.option("--tolerance", default=0.005, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="AUC drop allowed against the FP32 student.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def pipeline(out: Path, config_name: str, seed: int, signing_key: Path | None, model_version: str, threads: int,
             device: str, init_checkpoint: Path | None, mem_budget: str, latency_budget: str, tolerance: float,
             as_json: bool) -> None:
    """Synthetic cohort -> federated teacher -> distilled student -> ONNX -> INT8 candidates, measured
    here with --threads -> signed bundle. Exit 1 when no candidate meets accuracy and both budgets
    (the best one is still written, and the report says which limit failed)."""
    import torch  # late: `--help` stays fast

    from edge_runtime.units import parse_duration_ms, parse_size_mb

    from .pipeline import run_pipeline
    from .report import table_lines

    budgets = {"mem_mb": parse_size_mb(mem_budget), "latency_ms": parse_duration_ms(latency_budget)}
    torch.set_num_threads(threads)
    log = (lambda msg: click.echo(msg, err=True)) if as_json else click.echo
    result = run_pipeline(out, get_config(config_name), seed, signing_key, model_version, log, check_device(device),
                          init_checkpoint, budgets, tolerance, threads)
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


@main.command("train-teacher")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for federated.pt and rounds.jsonl.")
@click.option("--sites", default=4, show_default=True, type=click.IntRange(1, 64), help="Simulated sites (non-IID).")
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(1, 10_000), help="Federated rounds.")
@click.option("--strategy", default="dwfl", show_default=True,
              type=click.Choice(["dwfl", "fedavg", "fedprox", "fedavgm", "centralized", "local"]),
              help="Aggregation rule, or a reference point: centralized (pooled data) / local (each site alone).")
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
def train_teacher(out: Path, sites: int, rounds: int, strategy: str, config_name: str, cases_per_site: int,
                  val_per_site: int, test_per_site: int, local_epochs: int, beta: float, temperature: float, dynamic: str,
                  label_alpha: float | None, local_norm: bool, aux_weight: float | None, seed: int, resume: bool,
                  threads: int, device: str, init_checkpoint: Path | None) -> None:
    """Federated teacher training, simulated: each site streams only its own cases; per round the
    per-site validation AUC and aggregation weights are logged (OUT/rounds.jsonl) and checkpointed."""
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
                          local_norm=local_norm, device=check_device(device), init_checkpoint=init_checkpoint)
    if strategy in BASELINES:
        result = run_baseline(out, cfg, spec, seed, click.echo)
        click.echo(f"{strategy}: validation AUC " + json.dumps(result["rounds"][-1]["val_auc"]))
    else:
        result = run_federation(out, cfg, spec, seed, resume, click.echo)
    if result["test_auc"]:
        click.echo("test AUC " + json.dumps(result["test_auc"]))


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
@handle_errors
def synth(out: Path, cases: int, sites: int, seed: int, config_name: str, start: int, ct_format: str, site: int | None) -> None:
    """Write synthetic cases as real files (DICOM series / NIfTI, PNG tiles, CSV expression) + manifest."""
    from edge_runtime.synthetic import SynthConfig, SyntheticCohort

    from .synth_files import write_cohort

    cfg = get_config(config_name)
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out}: exists and is not a directory")
    if site is not None and site >= sites:
        raise BadInput(f"--site {site} does not exist: the cohort has sites 0 .. {sites - 1}")
    cohort = SyntheticCohort(SynthConfig(seed=seed, n_sites=sites, spec=cfg.input))
    manifest = write_cohort(cohort, out, start, cases, list(cfg.classes), ct_format, site)
    click.echo(f"wrote {cases} cases and {manifest}")


if __name__ == "__main__":
    main()
