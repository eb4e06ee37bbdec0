"""Kill -9 at the k-th step of a process: a seeded "random point" that a rerun hits again.

A *step* is anything whose interruption could leave state behind: a file renamed, fsynced, written
with os.write or unlinked; a database statement or commit; an HTTP request sent or its answer
received; a stored blob read. ``arm()`` runs first in a child process (the tests pass it as code to
``python -c``) and wraps those calls. Each step gets a label ``PHASE:KIND:DETAIL`` where PHASE names
the operation in progress (``swap``, ``finetune``, ``upload`` on a clinic; ``upload``, ``aggregate``,
``publish`` on the server).

    DWFL_CRASH_LOG=FILE   append every step's label to FILE (a dry run: how many steps, which)
    DWFL_CRASH_AT=K       send SIGKILL to this process at step K: no cleanup, no atexit, no flush,
                          exactly what `kill -9` does
    DWFL_FULL_AT=K        the disk fills up at step K, an os.write: half of its bytes are written,
                          then it raises ENOSPC (what a full disk does to a write)
    DWFL_CRASH_AT=LABEL   a named crash point: SIGKILL at the first step whose label starts with
                          LABEL (e.g. ``publish:rename-done:``: the new version's first blob is on disk)

Nothing here is imported by the product; the wrapped functions are the real ones, called unchanged.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
from pathlib import Path

_state = {"n": 0, "phase": "start", "at": 0, "at_label": "", "full": 0, "log": None}


def step(kind: str, detail: str = "") -> None:
    _state["n"] += 1
    label = f"{_state['phase']}:{kind}:{detail}"
    if _state["log"] is not None:
        _state["log"].write(label + "\n")
        _state["log"].flush()
    if _state["n"] == _state["at"] or (_state["at_label"] and label.startswith(_state["at_label"])):
        os.kill(os.getpid(), signal.SIGKILL)


def _name(path) -> str:
    """Folder and file name, without the random part of a temporary name."""
    p = Path(os.fsdecode(path))
    name = p.name.split(".tmp-")[0] + (".tmp" if ".tmp-" in p.name else "")
    return f"{p.parent.name}/{name}"


def _around(kind: str, detail=lambda *a, **k: ""):
    """A wrapper that is a step before and after the real call."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            d = detail(*args, **kwargs)
            step(kind, d)
            if kind == "write" and _state["n"] == _state["full"]:
                fd, data = args[0], bytes(args[1])
                fn(fd, data[:len(data) // 2])  # the disk takes part of it, then is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            out = fn(*args, **kwargs)
            step(kind + "-done", d)
            return out
        return inner
    return wrap


def in_phase(phase: str):
    """Label the steps made inside a function with ``phase`` (restored on return)."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            before = _state["phase"]
            _state["phase"] = phase
            try:
                return fn(*args, **kwargs)
            finally:
                _state["phase"] = before
        return inner
    return wrap


def then_phase(phase: str):
    """Steps after a function returns belong to ``phase`` (until an enclosing in_phase restores)."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            out = fn(*args, **kwargs)
            _state["phase"] = phase
            return out
        return inner
    return wrap


def arm(role: str) -> None:
    """Install the wrappers for a ``clinic`` (edge-run) or ``server`` (edge-server) process."""
    _state["full"] = int(os.environ.get("DWFL_FULL_AT", "0"))
    at = os.environ.get("DWFL_CRASH_AT", "0")
    _state["at"], _state["at_label"] = (int(at), "") if at.isdigit() else (0, at)
    if os.environ.get("DWFL_CRASH_LOG"):
        _state["log"] = open(os.environ["DWFL_CRASH_LOG"], "a")  # noqa: SIM115 - lives as long as the process

    os.replace = _around("rename", lambda src, dst, **k: _name(dst))(os.replace)
    os.rename = _around("rename", lambda src, dst, **k: _name(dst))(os.rename)
    os.fsync = _around("fsync")(os.fsync)
    os.write = _around("write")(os.write)
    os.unlink = _around("unlink", lambda p, **k: _name(p))(os.unlink)

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    event.listen(Engine, "before_cursor_execute", lambda conn, cur, stmt, *a: step("sql", " ".join(stmt.split()[:3])))
    event.listen(Engine, "commit", lambda conn: step("commit"))

    if role == "clinic":
        import httpx

        from edge_runtime.finetune import run
        from edge_runtime.sync import client

        httpx.Client.send = _around("http", lambda self, req, **k: f"{req.method} {req.url.path}")(httpx.Client.send)
        client.Client.pull = in_phase("swap")(client.Client.pull)
        client.Client.activate = in_phase("swap")(client.Client.activate)  # the pulled version made current (after scoring)
        client.Client.upload_pending = in_phase("upload")(client.Client.upload_pending)
        run.finetune = in_phase("finetune")(run.finetune)
    elif role == "server":
        from federation.aggregation import Strategy
        from server import rounds
        from server.blobs import BlobStore

        _state["phase"] = "upload"  # what a server does between aggregations
        BlobStore.get = _around("blob-read")(BlobStore.get)
        rounds.claim = in_phase("aggregate")(rounds.claim)
        rounds.aggregate_round = in_phase("aggregate")(rounds.aggregate_round)
        Strategy.aggregate = then_phase("publish")(Strategy.aggregate)  # new blobs, then one transaction
    else:
        raise ValueError(role)
