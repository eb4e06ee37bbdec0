"""Closing rounds and aggregating them (DESIGN §4, §8): math in federation.aggregation, here only
the claim, the streaming source over stored blobs and the publication of the new signed version.

A round closes when ``min_clients`` updates arrived or its deadline passed (with at least one
update). Exactly one process aggregates it: the one whose atomic
``UPDATE rounds SET state='aggregating' WHERE id=? AND state='open'`` changed the row. A process
killed while aggregating leaves the claim; after ``lease_seconds`` another takes it over. The new
version, the round's closing and the next round are one transaction: a round aggregates once. That
transaction re-reads which updates count (a clinic revoked meanwhile has its update dropped, see
``Server.revoke``); if they changed, nothing is published and the round goes back to open.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import time
import uuid

import numpy as np
from sqlalchemy import and_, or_, select, update

from edge_runtime import MODALITIES
from federation.aggregation import DWFL, ClientUpdate, UpdateMeta

from . import db
from .service import Server

log = logging.getLogger(__name__)
WORKER_ID = f"{socket.gethostname()[:30]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def branch_of(name: str) -> str | None:
    """Adapter i belongs to modality i; fusion and classifier are shared."""
    if name.startswith("adapters."):
        i = int(name.split(".")[1])
        return MODALITIES[i] if i < len(MODALITIES) else None
    return None


def due_rounds(srv: Server) -> list[int]:
    t = db.now()
    r = db.rounds.c
    with srv.engine.connect() as conn:
        rows = conn.execute(select(r.id).where(or_(
            and_(r.state == "open", or_(r.n_updates >= r.min_clients, and_(r.deadline <= t, r.n_updates > 0))),
            and_(r.state == "aggregating", r.claimed_at < t - srv.config.lease_seconds),
        ))).all()
    return [row.id for row in rows]


def claim(srv: Server, round_id: int) -> bool:
    t = db.now()
    r = db.rounds.c
    with srv.engine.begin() as conn:
        n = conn.execute(update(db.rounds).where(r.id == round_id, or_(
            r.state == "open", and_(r.state == "aggregating", r.claimed_at < t - srv.config.lease_seconds)))
            .values(state="aggregating", claimed_by=WORKER_ID, claimed_at=t)).rowcount
    return n == 1


def aggregate_round(srv: Server, round_id: int, crash_after_blobs: bool = False) -> int | None:
    """Aggregate a claimed round and publish the result; returns the new version (None: lost the claim)."""
    with srv.engine.connect() as conn:
        rnd = conn.execute(select(db.rounds).where(db.rounds.c.id == round_id)).one()
        rows = conn.execute(counted(round_id)).all()
    base = srv.manifest(rnd.base_version)
    global_params = srv.head_params(rnd.base_version)

    def source():
        for row in rows:  # one sealed blob at a time: memory O(model)
            meta, delta = srv.read_update(row)
            yield ClientUpdate(UpdateMeta(client=row.clinic, n=int(meta["n"]), val_loss=float(meta["val_loss"]),
                                          modality_fraction=meta["modality_fraction"], staleness=int(row.staleness),
                                          noise_multiplier=float(meta["noise_multiplier"])), delta)

    t0 = time.perf_counter()
    result = DWFL(beta=srv.config.beta).aggregate(global_params, source, branch_of)
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v, dtype=np.float32) for k, v in result.params.items()})
    report = {"accepted": result.accepted, "rejected": [list(x) for x in result.rejected], "weights": result.weights,
              "clip_bound": round(result.clip_bound, 6), "norms": {k: round(v, 6) for k, v in result.norms.items()},
              "seconds": round(time.perf_counter() - t0, 3), "aggregated_by": WORKER_ID}
    weights_name = base["head"]["weights"]
    files = {name: srv.blobs.get(meta["sha256"]) for name, meta in base["files"].items() if name != weights_name}
    files[weights_name] = buf.getvalue()
    root_version = str(base.get("federation", {}).get("root_model_version", base["model_version"]))
    body = {k: v for k, v in base.items() if k not in ("signature", "files", "server_version")}
    body["head"] = {**base["head"], "runtime": "numpy"}  # head.npz is the global model; head.onnx is the first version's
    body["model_version"] = f"{root_version}+fl.r{round_id}"
    body["federation"] = {"root_model_version": root_version, "round": round_id, "base_version": rnd.base_version,
                          "clients": result.accepted, "weights": result.weights.get("shared", {})}
    if crash_after_blobs:
        os._exit(9)
    try:
        with srv.engine.begin() as conn:
            n = conn.execute(update(db.rounds).where(db.rounds.c.id == round_id, db.rounds.c.state == "aggregating",
                                                     db.rounds.c.claimed_by == WORKER_ID)
                             .values(state="closed", closed_at=db.now(), report=report)).rowcount
            if n != 1:
                raise _LostClaim
            if set(conn.execute(counted(round_id).with_only_columns(db.updates.c.update_id)).scalars()) != {row.update_id for row in rows}:
                raise _Recount  # an update was dropped meanwhile (Server.revoke): publish nothing that counts it
            version = srv.publish_manifest(body, files, round_id, conn)
            conn.execute(update(db.rounds).where(db.rounds.c.id == round_id).values(result_version=version))
            srv.open_round(conn, version)
    except _LostClaim:
        return None
    except _Recount:
        r = db.rounds.c
        with srv.engine.begin() as conn:  # back to open: the next tick aggregates what is left, if the round is still due
            conn.execute(update(db.rounds).where(r.id == round_id, r.state == "aggregating", r.claimed_by == WORKER_ID)
                         .values(state="open", claimed_by=None, claimed_at=None))
        log.warning("round %d: an update was dropped while it was being aggregated (clinic revoked); it will be aggregated again",
                    round_id)
        return None
    return version


def counted(round_id: int):
    """The updates that count in a round: stored in it, from a clinic not revoked."""
    u = db.updates.c
    return (select(db.updates).join(db.clinics, u.clinic == db.clinics.c.name)
            .where(u.round == round_id, db.clinics.c.revoked_at.is_(None)).order_by(u.update_id))


class _LostClaim(Exception):
    pass


class _Recount(Exception):
    pass


def tick(srv: Server, crash_after_blobs: bool = False) -> list[int]:
    """Close and aggregate every round that is due and that this process wins; the new versions."""
    out = []
    for rid in due_rounds(srv):
        if claim(srv, rid):
            v = aggregate_round(srv, rid, crash_after_blobs)
            if v is not None:
                out.append(v)
    return out
