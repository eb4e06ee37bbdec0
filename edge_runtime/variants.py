"""Which encoder variant this clinic PC runs: an explicit ``--variant``, else the one
``edge-run profile --select`` measured and pinned here for this very bundle, else the export's choice
adjusted for this CPU's class (see ``select.variant_for_cpu``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .bundle import Bundle
from .cpuinfo import this_cpu
from .select import variant_for_cpu

STATE_ENV = "EDGE_RUN_STATE"


def default_state_dir() -> Path:
    """The clinic's state folder (variant pin, fine-tuning state): $EDGE_RUN_STATE, else ~/.dwfl-edge."""
    return Path(os.environ.get(STATE_ENV) or "~/.dwfl-edge").expanduser()


def bundle_fingerprint(bundle: Bundle) -> str:
    """Identifies the bundle's exact content: a pin never carries over to another bundle."""
    return hashlib.sha256((bundle.root / "manifest.json").read_bytes()).hexdigest()


def pin_document(bundle: Bundle, variant: str, figures: dict) -> dict:
    return {"bundle": bundle_fingerprint(bundle), "model_version": bundle.model_version, "variant": variant,
            "cpu": this_cpu().to_dict(), "figures": figures}


def resolve_variant(bundle: Bundle, requested: str | None, pin: dict | None, where: Path | None = None) -> tuple[str, str]:
    """(variant, why) from an explicit request, this PC's pin for the bundle, or the CPU."""
    if requested:
        return requested, "asked for with --variant"
    if pin is not None:
        return pin["variant"], f"pinned by `edge-run profile --select` ({where})"
    return variant_for_cpu(bundle.manifest, this_cpu().features)
