"""Progress bars for the long steps (training rounds, candidate search, fine-tuning, sync): rich on
an interactive terminal, silent otherwise (logs, CI, cron), so machine output stays clean."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("DWFL_NO_PROGRESS")


@contextmanager
def progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """``with progress("training", n) as advance: ... advance(1)``; a no-op when not on a terminal."""
    if not enabled():
        yield lambda _n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, transient=True, console=None) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
