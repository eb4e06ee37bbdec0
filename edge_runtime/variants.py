"""Which encoder variant this clinic PC runs: an explicit ``--variant``, else the one
``edge-run profile --select`` measured and pinned here for this very bundle, else the export's choice
adjusted for this CPU's class (see ``select.variant_for_cpu``)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .bundle import Bundle
from .cpuinfo import this_cpu
from .errors import BadInput
from .fsutil import write_atomic
from .select import variant_for_cpu

PIN_FILE = "variant.json"
STATE_ENV = "EDGE_RUN_STATE"


def default_state_dir() -> Path:
    """The clinic's state folder (variant pin, fine-tuning state): $EDGE_RUN_STATE, else ~/.dwfl-edge."""
    return Path(os.environ.get(STATE_ENV) or "~/.dwfl-edge").expanduser()


def bundle_fingerprint(bundle: Bundle) -> str:
    """Identifies the bundle's exact content: a pin never carries over to another bundle."""
    return hashlib.sha256((bundle.root / "manifest.json").read_bytes()).hexdigest()


def read_pin(state_dir: Path, bundle: Bundle) -> dict | None:
    path = state_dir / PIN_FILE
    if not path.exists():
        return None
    try:
        pin = json.loads(path.read_text())
        if not isinstance(pin, dict) or not isinstance(pin.get("variant"), str):
            raise ValueError("no variant")
    except (OSError, ValueError) as exc:
        raise BadInput(f"{path}: unreadable variant pin ({exc}); delete it or run `edge-run profile --select` again") from exc
    return pin if pin.get("bundle") == bundle_fingerprint(bundle) else None


def write_pin(state_dir: Path, bundle: Bundle, variant: str, figures: dict) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    doc = {"bundle": bundle_fingerprint(bundle), "model_version": bundle.model_version, "variant": variant,
           "cpu": this_cpu().to_dict(), "figures": figures}
    path = state_dir / PIN_FILE
    write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode())
    return path


def resolve_variant(bundle: Bundle, requested: str | None, state_dir: Path | None) -> tuple[str, str]:
    """(variant, why)."""
    if requested:
        return requested, "asked for with --variant"
    state_dir = state_dir or default_state_dir()
    pin = read_pin(state_dir, bundle)
    if pin is not None:
        return pin["variant"], f"pinned by `edge-run profile --select` ({state_dir})"
    return variant_for_cpu(bundle.manifest, this_cpu().features)
