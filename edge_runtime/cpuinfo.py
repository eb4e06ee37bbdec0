"""What this CPU can do, for choosing a bundle variant: INT8 convolutions pay off only with VNNI,
and INT8 3D convolutions are slow on every CPU measured (DESIGN §7)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_class(features: set[str] | list[str]) -> str:
    """The coarse class that decides INT8 speed: 'vnni' (AVX-512 VNNI or AVX-VNNI), 'avx2', 'baseline'."""
    features = set(features)
    if features & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return "vnni"
    return "avx2" if "avx2" in features else "baseline"


@dataclass(frozen=True)
class CpuInfo:
    model: str
    cores: int
    features: tuple[str, ...]

    @property
    def cls(self) -> str:
        return cpu_class(self.features)

    def to_dict(self) -> dict:
        return {"cpu": self.model, "cores": self.cores, "features": list(self.features), "class": self.cls}


def this_cpu() -> CpuInfo:
    flags = cpu_flags()
    return CpuInfo(cpu_model(), os.cpu_count() or 1, tuple(sorted(f for f in FEATURES if f in flags)))
