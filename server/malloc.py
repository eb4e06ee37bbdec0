"""Allocator tuning for the long-running server process.

glibc gives threads their own heap arenas (up to 8 per core); in a threaded server that handles
many small requests, memory freed in one arena is not reused by another and the resident size
creeps up over hours (measured: benchmarks/server_soak.py). Two arenas keep it flat, the same as
starting with MALLOC_ARENA_MAX=2, the usual advice for threaded Python servers.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_ARENA_MAX = -8  # from glibc's malloc.h


def limit_arenas(n: int = 2) -> bool:
    """Cap glibc's arenas at ``n`` unless MALLOC_ARENA_MAX is set; False where there is no glibc."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, n))
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
