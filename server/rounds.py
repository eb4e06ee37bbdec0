"""Closing rounds and aggregating them (DESIGN §4, §8): math in federation.aggregation, here only
the claim, the stored updates as aggregation takes them and the publication of the new signed version.

A round closes when ``min_clients`` updates arrived or its deadline passed (with at least one
update). Exactly one process aggregates it: the one whose atomic
``UPDATE rounds SET state='aggregating' WHERE id=? AND state='open'`` changed the row. A process
killed while aggregating leaves the claim; after ``lease_seconds`` another takes it over. The new
version, the round's closing and the next round are one transaction: a round aggregates once. That
transaction re-reads which updates count (a clinic revoked meanwhile has its update dropped, see
``Server.revoke``); if they changed, nothing is published and the round goes back to open.

Each update is opened once (its norm and metadata were stored when it arrived); one that cannot be
opened is rejected with the reason in the round's report. A round that cannot be aggregated at all
is closed as ``failed`` with the reason and the next round opens on the same version; so is one whose
aggregated head is not finite or exceeds ``max_param_abs`` (checked before anything is published; the
server has no validation cases of its own to score it on).
"""

from __future__ import annotations

import io
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

import numpy as np
from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import DBAPIError

from edge_runtime import MODALITIES
from edge_runtime.errors import BadInput
from edge_runtime.finetune.head import params_bytes
from edge_runtime.finetune.plan import FinetunePlan, trainable_subset
from edge_runtime.sync import update as codec
from federation.aggregation import ClientUpdate, UpdateMeta, l2_norm, unpublishable

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


def counted(round_id: int):
    """The updates that count in a round: stored in it, from a clinic not revoked; with the base
    version each was trained on (the HPKE binding). One query for the whole round, none per row."""
    u, r = db.updates.c, db.rounds.c
    return (select(db.updates, r.base_version.label("sent_base"))
            .join(db.rounds, r.id == u.sent_round).join(db.clinics, u.clinic == db.clinics.c.name)
            .where(u.round == round_id, db.clinics.c.revoked_at.is_(None)).order_by(u.update_id))


def stored_updates(srv: Server, rows) -> list[ClientUpdate]:
    """The round's updates as aggregation takes them: metadata and norm from the rows (computed on
    arrival), each delta opened by its ``load()``."""
    return [_stored(srv, row) for row in rows]


def _stored(srv: Server, row) -> ClientUpdate:
    summary = codec.Summary.from_dict(row.meta)

    def load() -> dict:
        return srv.stored_delta(blob_sha256=row.blob_sha256, clinic=row.clinic, sent_round=row.sent_round,
                                sent_base=row.sent_base, update_id=row.update_id, kem=row.kem)

    meta = UpdateMeta(client=row.clinic, n=summary.n, val_loss=summary.val_loss, modality_fraction=summary.modality_fraction,
                      staleness=int(row.staleness), noise_multiplier=summary.noise_multiplier)
    if "norm" not in row.meta:  # stored before the norm was computed on arrival: measured here, once
        try:
            return ClientUpdate(meta, l2_norm(load()), load)
        except Exception as exc:  # noqa: BLE001 - rejected at aggregation with this reason
            return ClientUpdate(meta, 0.0, _failing(exc))
    return ClientUpdate(meta, summary.norm, load)


def _failing(exc: Exception):
    def load() -> dict:
        raise exc
    return load


# A stateful strategy's state (dwfl_mw's lambda per clinic, FedAvgM's velocity, FedAdam's moments) is
# saved with each version it makes: an npz blob named in the report of the round that made the version
# (server-side only: it is never published to clinics). The next round on that version goes on from it;
# a failed round commits none, so its retry starts from the same state; after a restart nothing is lost.
def save_state(srv: Server, state: dict[str, np.ndarray]) -> dict:
    if not state:
        return {}
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in sorted(state.items())})
    return {"state_sha256": srv.blobs.put(buf.getvalue()), "state_entries": len(state)}


def saved_state(srv: Server, version: int, federation: str = "head") -> dict[str, np.ndarray]:
    """The state saved with ``version`` by the federation's configured strategy; {} for the first
    version, or when another strategy made it (a changed strategy starts afresh, logged)."""
    strategy = srv.config.rules(federation).strategy
    with srv.engine.connect() as conn:
        report = conn.execute(select(db.rounds.c.report).where(db.rounds.c.result_version == version)).scalar()
    saved = (report or {}).get("strategy") or {}
    if saved.get("name") not in (None, strategy):
        log.warning("version %d was made by strategy %r; %r starts without its state", version, saved["name"], strategy)
        return {}
    if not saved.get("state_sha256"):
        return {}
    try:
        with np.load(io.BytesIO(srv.blobs.get(saved["state_sha256"])), allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError, EOFError, BadInput) as exc:  # lost or damaged blob: the federation goes on
        log.warning("strategy state of version %d is unreadable (%s); starting afresh", version, exc)
        return {}


@dataclass
class Publication:
    """A new version as a federation's aggregation makes it: manifest body, files, round report."""
    body: dict
    files: dict
    report: dict


class Unpublishable(Exception):
    """The round's aggregate may not be published (no usable update, not finite, too large)."""


def aggregation_report(srv: Server, result, strategy) -> dict:
    """What both federations record about an aggregation (weights, clipping, the strategy's state)."""
    for clinic, reason in result.rejected:
        log.warning("update rejected at aggregation: %s", reason, extra={"clinic": clinic})
    bad = unpublishable(result.params, srv.config.max_param_abs)
    if not result.accepted:
        bad = "no usable update: " + "; ".join(f"{c}: {r}" for c, r in result.rejected)[:500]
    if bad:  # checked before anything is published: the round fails with the reason, the model stays
        raise Unpublishable(f"aggregated model refused before publication: {bad}")
    return {"accepted": result.accepted, "rejected": [list(x) for x in result.rejected], "weights": result.weights,
            "clip_bound": round(result.clip_bound, 6), "clip_ceiling": round(strategy.max_clip, 6),
            "max_weight": strategy.max_weight, "norms": {k: round(v, 6) for k, v in result.norms.items()},
            "strategy": {"name": strategy.name, **save_state(srv, strategy.state_dict())}}


def aggregate_head(strategy, global_params: dict[str, np.ndarray], updates: list[ClientUpdate], plan: FinetunePlan):
    """The head federation's aggregation, one home (the server and the federation simulation): the
    strategy over the plan's trainable parameters, the others kept as they are. Its result's
    ``params`` is the whole new head."""
    result = strategy.aggregate(trainable_subset(global_params, plan), updates, branch_of)
    result.params = {**global_params, **result.params}
    return result


def head_version(srv: Server, rnd, rows) -> Publication:
    """The head federation's new version: the aggregated head.npz in a copy of the base bundle."""
    base = srv.manifest(rnd.base_version)
    global_params = srv.head_params(rnd.base_version)
    plan, trained = srv.trainable_head(rnd.base_version)
    strategy = srv.strategy_for(trained, saved_state(srv, rnd.base_version))
    result = aggregate_head(strategy, global_params, stored_updates(srv, rows), plan)
    report = aggregation_report(srv, result, strategy)
    weights_name = base["head"]["weights"]
    files = {name: srv.blobs.get(meta["sha256"]) for name, meta in base["files"].items() if name != weights_name}
    files[weights_name] = params_bytes(result.params)
    root_version = str(base.get("federation", {}).get("root_model_version", base["model_version"]))
    body = {k: v for k, v in base.items() if k not in ("signature", "files", "server_version")}
    body["head"] = {**base["head"], "runtime": "numpy"}  # head.npz is the global model; head.onnx is the first version's
    body["model_version"] = f"{root_version}+fl.r{rnd.id}"
    body["federation"] = {"root_model_version": root_version, "round": rnd.id, "base_version": rnd.base_version,
                          "clients": result.accepted, "weights": result.weights.get("shared", {})}
    return Publication(body, files, report)


def aggregate_round(srv: Server, round_id: int) -> int | None:
    """Aggregate a claimed round of either federation and publish the result; returns the new version
    (None: lost the claim, or the round failed). An update that cannot be opened is rejected with its
    reason (in the round's report)."""
    from .teacher import teacher_version  # the teacher federation's files (safetensors, streamed updates)

    with srv.engine.connect() as conn:
        rnd = conn.execute(select(db.rounds).where(db.rounds.c.id == round_id)).one()
        rows = conn.execute(counted(round_id)).all()
    t0 = time.perf_counter()
    try:
        made = (teacher_version if rnd.federation == "teacher" else head_version)(srv, rnd, rows)
    except Unpublishable as exc:
        log.error("round %d: %s", round_id, exc, extra={"round": round_id})
        fail_round(srv, round_id, str(exc))
        return None
    report = {**made.report, "seconds": round(time.perf_counter() - t0, 3), "aggregated_by": WORKER_ID}
    try:
        with srv.engine.begin() as conn:
            n = conn.execute(update(db.rounds).where(db.rounds.c.id == round_id, db.rounds.c.state == "aggregating",
                                                     db.rounds.c.claimed_by == WORKER_ID)
                             .values(state="closed", closed_at=db.now(), report=report)).rowcount
            if n != 1:
                raise _LostClaim
            if set(conn.execute(counted(round_id).with_only_columns(db.updates.c.update_id)).scalars()) != {row.update_id for row in rows}:
                raise _Recount  # an update was dropped meanwhile (Server.revoke): publish nothing that counts it
            version = srv.publish_manifest(made.body, made.files, round_id, conn, federation=rnd.federation)
            conn.execute(update(db.rounds).where(db.rounds.c.id == round_id).values(result_version=version))
            srv.open_round(conn, version, rnd.federation)
    except _LostClaim:
        log.warning("lost the claim on the round to another process", extra={"round": round_id})
        return None
    except _Recount:
        r = db.rounds.c
        with srv.engine.begin() as conn:  # back to open: the next tick aggregates what is left, if the round is still due
            conn.execute(update(db.rounds).where(r.id == round_id, r.state == "aggregating", r.claimed_by == WORKER_ID)
                         .values(state="open", claimed_by=None, claimed_at=None))
        log.warning("round %d: an update was dropped while it was being aggregated (clinic revoked); it will be aggregated again",
                    round_id)
        return None
    log.info("aggregated %d %s update(s) into version %d (%d rejected, %.2f s)", len(report["accepted"]), rnd.federation, version,
             len(report["rejected"]), report["seconds"], extra={"round": round_id})
    return version


class _LostClaim(Exception):
    pass


class _Recount(Exception):
    pass


def fail_round(srv: Server, round_id: int, reason: str) -> None:
    """Close a round that cannot be aggregated at all, with the reason, and open the next one on the same
    base version: the federation goes on instead of retrying the same round at every tick."""
    with srv.engine.begin() as conn:
        rnd = conn.execute(select(db.rounds).where(db.rounds.c.id == round_id)).one()
        n = conn.execute(update(db.rounds).where(db.rounds.c.id == round_id, db.rounds.c.state == "aggregating",
                                                 db.rounds.c.claimed_by == WORKER_ID)
                         .values(state="failed", closed_at=db.now(), report={"error": reason, "aggregated_by": WORKER_ID})).rowcount
        if n == 1:
            srv.open_round(conn, rnd.base_version, rnd.federation)


def tick(srv: Server) -> list[int]:
    """Close and aggregate every round that is due and that this process wins; the new versions. A
    database error leaves the claim for the lease to hand on (a later try); any other error fails the
    round with its reason."""
    out = []
    for rid in due_rounds(srv):
        if not claim(srv, rid):
            continue
        try:
            v = aggregate_round(srv, rid)
        except DBAPIError:
            log.exception("database error while aggregating; the claim lapses after the lease", extra={"round": rid})
            continue
        except Exception as exc:  # noqa: BLE001 - recorded on the round, never retried in a loop
            log.exception("round cannot be aggregated; closed as failed", extra={"round": rid})
            fail_round(srv, rid, f"{type(exc).__name__}: {exc}")
            continue
        if v is not None:
            out.append(v)
    return out
