"""Parsing of human budget strings ("1.8GB", "200ms") into plain numbers."""

from __future__ import annotations

import re

from .errors import BadInput

_SIZE = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_TIME = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]+)\s*$")


def _split(text: str, what: str, units: dict[str, float]) -> float:
    match = _NUMBER.match(text)
    if not match:
        raise BadInput(f"{what} {text!r} does not parse: expected a number with a unit ({', '.join(units)})")
    value, unit = float(match.group(1)), match.group(2).lower()
    if unit not in units:
        raise BadInput(f"{what} {text!r} has unknown unit {unit!r}: use one of {', '.join(units)}")
    if value <= 0:
        raise BadInput(f"{what} {text!r} must be positive")
    return value * units[unit]


def parse_size_mb(text: str) -> float:
    """'1.8GB' -> 1800.0 (decimal megabytes, the unit every report uses)."""
    return _split(text, "memory budget", _SIZE) / 1e6


def parse_duration_ms(text: str) -> float:
    """'200ms' -> 200.0, '0.2s' -> 200.0."""
    return _split(text, "latency budget", _TIME)
