"""Shared by the CLIs: refusals become one line on stderr and their exit code, never a traceback."""

from __future__ import annotations

import functools
import sys

import click

from .errors import BadInput


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BadInput as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper
