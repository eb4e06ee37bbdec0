"""Shared by the CLIs: refusals become one line on stderr and their exit code, never a traceback."""

from __future__ import annotations

import errno
import functools
import sys

import click

from .errors import BadInput

# The machine, not the input, stopped the command: every write is atomic, so nothing half-written
# stays behind; free space (or raise the quota) and run it again.
EXIT_ENVIRONMENT = 3
DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BadInput as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"error: {where}disk full or file size limit reached while writing ({exc.strerror}); "
                       "nothing half-written was kept, free space and run it again", err=True)
            sys.exit(EXIT_ENVIRONMENT)

    return wrapper
