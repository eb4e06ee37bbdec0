"""The export pipeline end to end: every stage of ``export.stages`` in order over OUT/work, then the
signed bundle in OUT. Every option is checked before the first stage starts; each stage writes
atomically, so a failure at any step leaves the earlier stages' outputs and no half bundle.
"""

from __future__ import annotations

from pathlib import Path

from .config import VARIANT_NAMES, PipelineConfig
from .stages import (
    DEFAULT_TOLERANCE,
    MEASURE_CASES,
    WORK_DIR,
    CaseCache,
    Log,
    PipelineResult,
    QuantizeOptions,
    bundle_stage,
    check_checkpoint,
    check_out,
    check_seed,
    distill_stage,
    export_stage,
    network_teacher_stage,
    quantize_stage,
    signing_key_for,
    train_teacher_stage,
)
from .work import Identity, Work


def run_pipeline(
    out: Path, cfg: PipelineConfig, *, seed: int = 0, signing_key: Path | None = None, model_version: str = "1",
    log: Log = print, device: str = "cpu", init_checkpoint: Path | None = None, budgets: dict[str, float] | None = None,
    tolerance: float = DEFAULT_TOLERANCE, threads: int = 2, measure_cases: int = MEASURE_CASES,
    variants: tuple[str, ...] = VARIANT_NAMES, network_teacher: tuple[Path, Path | None] | None = None,
) -> PipelineResult:
    """train-teacher -> distill -> export -> quantize -> bundle. ``result.ok`` is False when no
    variant met accuracy and both budgets (the best one is still written)."""
    out = Path(out)
    check_seed(seed)
    check_out(out)
    check_checkpoint(init_checkpoint)
    recipe = QuantizeOptions(tolerance, dict(budgets or {}), threads, tuple(variants), measure_cases).checked()
    signing_key_for(out, signing_key)  # fail on a bad key (given, or left by an earlier run) before hours of training
    work = Work(out / WORK_DIR, Identity.of(cfg, seed))
    work.check_folder()
    with CaseCache(work.root) as cases:  # one set of harmonized cases for all stages
        if network_teacher is not None:  # trained by hospitals over the network: (version folder, own norms)
            network_teacher_stage(work, cfg, folder=network_teacher[0], norms=network_teacher[1], log=log)
        else:
            train_teacher_stage(work, cfg, device=device, init_checkpoint=init_checkpoint, log=log, cases=cases)
        distill_stage(work, cfg, device=device, log=log, cases=cases)
        export_stage(work, cfg, log=log)
        quantize_stage(work, cfg, recipe, log=log, cases=cases)
    return bundle_stage(work, cfg, out=out, signing_key=signing_key, model_version=model_version, log=log)
