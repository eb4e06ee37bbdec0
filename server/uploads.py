"""A hospital's teacher update, received in chunks with resumable upload (DESIGN §10).

    begin     POST /v1/teacher/uploads            what the update is: id, round, base version, KEM,
                                                  the HPKE-sealed stream key, metadata, total size
    chunk     PUT  /v1/teacher/uploads/{id}/{i}   chunk i (chunk_size bytes; the last one shorter)
    status    GET  /v1/teacher/uploads/{id}       how many chunks the server has acknowledged
    complete  POST /v1/teacher/uploads/{id}/complete   the ciphertext's SHA-256: checked, opened, stored

Every request is signed (the signature covers the chunk's bytes and its index, in the path), so a
chunk is authenticated on arrival; the stream's AEAD authenticates the whole (order, truncation,
binding to sender, round and update id) when it is completed. A chunk is written at the byte offset
the database row acknowledges and the row is advanced in the same transaction, after the write is
fsynced: what is acknowledged is on disk, and bytes past it (a crash between the two) are cut off
before the next chunk. A chunk already acknowledged is answered, not written again; one ahead of the
acknowledged count is refused with the count, so the client resumes from there.

Nothing is stored before the checks that need no bytes pass: tier, round and staleness, id unused,
declared size within what the federation's model can take (and the hard ceiling), free disk space.
The server holds one chunk in memory, never an update.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from edge_runtime.fsutil import sha256_file
from edge_runtime.sync.hpke import KEMS, SealError, update_info
from federation.sealed_stream import StreamKey, open_stream
from federation.teacher import sealed_size_bounds
from federation.tensor_stream import stream_norm

from . import db
from .service import Accepted, Refusal, Server
from .teacher import teacher_shapes

log = logging.getLogger(__name__)
UPDATE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
FREE_MARGIN = 64 * 2**20  # disk the server keeps free beyond a declared upload


@dataclass(frozen=True)
class UploadStart:
    update_id: str
    round: int
    base_version: int
    kem: str
    stream_key: dict
    total_size: int
    meta: dict  # n, val_loss, modality_fraction, noise_multiplier


def part_path(srv: Server, upload_id: str) -> Path:
    return srv.home.root / "uploads" / f"{upload_id}.part"


def check_meta(meta: dict, max_n: int) -> dict:
    """What aggregation weighs an update by, in range (422 otherwise)."""
    try:
        n, loss = meta["n"], float(meta["val_loss"])
        fractions = {str(k): float(v) for k, v in (meta.get("modality_fraction") or {}).items()}
        sigma = float(meta.get("noise_multiplier", 0.0))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise Refusal(422, f"upload metadata is malformed ({exc})") from None
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_n:
        raise Refusal(422, f"upload metadata: n = {n!r} must be an integer in [1, {max_n}]")
    if not (math.isfinite(loss) and loss >= 0) or not all(0.0 <= f <= 1.0 for f in fractions.values()) \
            or not (math.isfinite(sigma) and sigma >= 0):
        raise Refusal(422, "upload metadata: val_loss, modality fractions or noise multiplier out of range")
    return {"n": n, "val_loss": loss, "modality_fraction": fractions, "noise_multiplier": sigma}


def _round_for(srv: Server, conn, sent_round: int, base_version: int) -> tuple[dict, int]:
    """The current teacher round an update for ``sent_round`` counts in, and its staleness."""
    sent = conn.execute(select(db.rounds).where(db.rounds.c.id == sent_round)).first()
    cur = srv.current_round(conn, "teacher")
    if sent is None or cur is None or sent.federation != "teacher":
        raise Refusal(404, f"unknown round {sent_round} (of the teacher federation)")
    if sent.base_version != base_version:
        raise Refusal(409, f"round {sent_round} is based on version {sent.base_version}, not {base_version}")
    if cur["state"] != "open":
        raise Refusal(503, f"round {cur['id']} is being aggregated; retry shortly")
    staleness = srv.staleness(conn, "teacher", sent_round, cur["id"])
    limit = srv.config.teacher_max_staleness
    if staleness > limit:
        raise Refusal(409, f"update for round {sent_round} is too stale ({staleness} rounds > {limit})")
    return cur, staleness


def begin(srv: Server, hospital: str, req: UploadStart) -> dict:
    if not UPDATE_ID.match(req.update_id):
        raise Refusal(422, "update id must be 1-128 letters, digits, '.', '_' or '-'")
    if req.kem not in KEMS:
        raise Refusal(422, f"unknown KEM {req.kem!r}")
    try:
        StreamKey.from_dict(req.stream_key)
    except Exception as exc:  # noqa: BLE001 - BadInput, or a non-dict
        raise Refusal(422, f"stream key is malformed ({exc})") from None
    meta = check_meta(req.meta, srv.config.max_n)
    if req.total_size > srv.config.teacher_max_bytes:
        raise Refusal(413, f"declared update of {req.total_size} bytes exceeds the server's {srv.config.teacher_max_bytes}")
    with srv.engine.connect() as conn:
        existing = conn.execute(select(db.uploads).where(db.uploads.c.upload_id == req.update_id)).first()
        if existing is not None:  # a client that lost the answer asks again: the same declaration is idempotent
            same = (existing.clinic, existing.round, existing.base_version, existing.total_size, existing.kem) == \
                (hospital, req.round, req.base_version, req.total_size, req.kem) and existing.stream_key == req.stream_key
            if not same:
                raise Refusal(409, f"upload id {req.update_id!r} is already used for another update")
            return describe(existing)
        if conn.execute(select(db.updates.c.update_id).where(db.updates.c.update_id == req.update_id)).first():
            raise Refusal(409, f"update id {req.update_id!r} is already used")
        cur, _ = _round_for(srv, conn, req.round, req.base_version)
        if conn.execute(select(db.updates.c.update_id).where(db.updates.c.clinic == hospital, db.updates.c.round == cur["id"])).first():
            raise Refusal(409, f"hospital {hospital!r} already sent an update for round {cur['id']}")
        u = db.uploads.c
        other = conn.execute(select(u.upload_id).where(u.clinic == hospital, u.round == req.round, u.state != "complete")).first()
        if other is not None:  # one upload in progress per hospital and round: no one fills the disk with parts
            raise Refusal(409, f"hospital {hospital!r} is already uploading {other.upload_id!r} for round {req.round}")
    low, high = sealed_size_bounds(teacher_shapes(srv, req.base_version))
    if not low <= req.total_size <= high:
        raise Refusal(422, f"declared size {req.total_size} does not fit the model of version {req.base_version} "
                           f"(an update of its parameters is {low} to {high} bytes)")
    _forget_abandoned(srv, hospital)
    folder = part_path(srv, req.update_id).parent
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < req.total_size + FREE_MARGIN:
        raise Refusal(507, f"server has {free // 2**20} MiB free for uploads, the update needs {req.total_size // 2**20} MiB")
    t = db.now()
    try:
        with srv.engine.begin() as conn:
            conn.execute(insert(db.uploads).values(
                upload_id=req.update_id, clinic=hospital, round=req.round, base_version=req.base_version, kem=req.kem,
                stream_key=req.stream_key, meta=meta, total_size=req.total_size, chunk_size=srv.config.teacher_chunk_bytes,
                received_chunks=0, received_bytes=0, state="receiving", created_at=t, updated_at=t))
    except IntegrityError:
        raise Refusal(409, f"upload id {req.update_id!r} was begun meanwhile; ask for its status") from None
    log.info("upload %s begun: %d bytes in chunks of %d", req.update_id, req.total_size, srv.config.teacher_chunk_bytes,
             extra={"clinic": hospital, "round": req.round})
    return status(srv, hospital, req.update_id)


def _forget_abandoned(srv: Server, hospital: str) -> None:
    """Discard this hospital's unfinished uploads for rounds it can no longer send to (too stale):
    their parts would otherwise stay on disk for good."""
    u = db.uploads.c
    with srv.engine.connect() as conn:
        cur = srv.current_round(conn, "teacher")
        rows = conn.execute(select(u.upload_id, u.round).where(u.clinic == hospital, u.state == "receiving")).all()
        stale = [r.upload_id for r in rows
                 if cur is None or srv.staleness(conn, "teacher", r.round, cur["id"]) > srv.config.teacher_max_staleness]
    for upload_id in stale:
        log.info("discarding abandoned upload %s (its round is past max staleness)", upload_id, extra={"clinic": hospital})
        discard(srv, upload_id)


def describe(row) -> dict:
    chunks = -(-int(row.total_size) // int(row.chunk_size))
    return {"update_id": row.upload_id, "state": row.state, "total_size": int(row.total_size), "chunk_size": int(row.chunk_size),
            "chunks": chunks, "received_chunks": int(row.received_chunks), "received_bytes": int(row.received_bytes)}


def _row(srv: Server, conn, hospital: str, upload_id: str):
    row = conn.execute(select(db.uploads).where(db.uploads.c.upload_id == upload_id)).first()
    if row is None or row.clinic != hospital:  # another hospital's upload is not named to it
        raise Refusal(404, f"no upload {upload_id!r} from {hospital!r}")
    return row


def status(srv: Server, hospital: str, upload_id: str) -> dict:
    with srv.engine.connect() as conn:
        return describe(_row(srv, conn, hospital, upload_id))


def chunk(srv: Server, hospital: str, upload_id: str, index: int, data: bytes) -> dict:
    """Store chunk ``index`` if it is the next one; answer (without writing) one already acknowledged."""
    u = db.uploads.c
    with srv.engine.begin() as conn:
        # The write comes first (SQLite: the transaction takes the write lock at once, never upgrading a
        # read; both: the row is locked, so a concurrent request for the same chunk waits here)
        locked = conn.execute(update(db.uploads).where(u.upload_id == upload_id, u.clinic == hospital, u.state == "receiving",
                                                       u.received_chunks == index).values(updated_at=db.now())).rowcount == 1
        row = _row(srv, conn, hospital, upload_id)
        info = describe(row)
        if not locked:
            if row.state != "receiving" or index < row.received_chunks:
                return {**info, "status": "already have it"}
            raise Refusal(409, f"chunk {index} is ahead: the server has acknowledged {row.received_chunks} chunk(s); send chunk {row.received_chunks}")
        last = info["chunks"] - 1
        want = row.chunk_size if index < last else row.total_size - row.chunk_size * last
        if index > last or len(data) != want:
            raise Refusal(422, f"chunk {index} has {len(data)} bytes; it must have {want} (of {row.total_size} declared)")
        _write_at(part_path(srv, upload_id), int(row.received_bytes), data)
        conn.execute(update(db.uploads).where(u.upload_id == upload_id)
                     .values(received_chunks=index + 1, received_bytes=row.received_bytes + len(data)))
    return {**info, "received_chunks": index + 1, "received_bytes": int(row.received_bytes) + len(data), "status": "stored"}


def _write_at(path: Path, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` (cutting what a crash left beyond it), fsynced; disk full: 507,
    and the file is cut back to ``offset``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, offset)
        try:
            view = memoryview(data)
            while view:
                view = view[os.pwrite(fd, view, offset + len(data) - len(view)):]
            os.fsync(fd)
        except OSError as exc:
            os.ftruncate(fd, offset)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise Refusal(507, "server's upload folder is full; the chunk was not stored (retry later)") from None
            raise
    finally:
        os.close(fd)


COMPLETE_LEASE_S = 600.0  # a completion claimed longer ago than this (its process died) may be claimed again


def complete(srv: Server, hospital: str, upload_id: str, sha256: str) -> Accepted:
    """Check the whole ciphertext (its hash as the hospital signed it; it opens with the stream key
    bound to this sender, round and id; its tensors match the model, all finite), then store it as a
    blob and count it in the current round. One completion at a time (the row is claimed: a retry
    while one runs gets 503). A failed check discards the upload (its id can begin again), stores
    nothing. The part file is linked into the blob store and removed only after the commit: a crash
    anywhere leaves either the upload to complete again or the update stored."""
    u = db.uploads.c
    with srv.engine.begin() as conn:
        claimed = conn.execute(update(db.uploads).where(
            u.upload_id == upload_id, u.clinic == hospital, u.received_bytes == u.total_size,
            (u.state == "receiving") | ((u.state == "completing") & (u.updated_at < db.now() - COMPLETE_LEASE_S)))
            .values(state="completing", updated_at=db.now())).rowcount == 1
        row = _row(srv, conn, hospital, upload_id)
    if not claimed:
        if row.state == "complete":
            with srv.engine.connect() as conn:
                dup = conn.execute(select(db.updates).where(db.updates.c.update_id == upload_id)).first()
            return Accepted("already have it", upload_id, dup.round if dup else row.round, dup.staleness if dup else 0)
        if row.state == "completing":
            raise Refusal(503, f"upload {upload_id!r} is being completed; retry shortly")
        raise Refusal(409, f"upload {upload_id!r} has {row.received_bytes} of {row.total_size} bytes; send the rest first")
    path = part_path(srv, upload_id)
    try:
        norm = _check_stream(srv, row, path, sha256)
        with srv.engine.connect() as conn:
            cur, staleness = _round_for(srv, conn, row.round, row.base_version)
    except Refusal as exc:
        if exc.status == 503:  # the round is being aggregated: the upload stays, to be completed again
            _unclaim(srv, upload_id)
        else:
            discard(srv, upload_id)
        raise
    except BaseException:
        _unclaim(srv, upload_id)
        raise
    link = srv.blobs.temp("part")
    os.link(path, link)  # the part stays until the row says complete
    sha, _ = srv.blobs.put_file(link)
    try:
        with srv.engine.begin() as conn:
            if conn.execute(update(db.rounds).where(db.rounds.c.id == cur["id"], db.rounds.c.state == "open")
                            .values(n_updates=db.rounds.c.n_updates + 1)).rowcount != 1:
                raise Refusal(503, f"round {cur['id']} closed meanwhile; retry shortly")
            if conn.execute(select(db.clinics.c.revoked_at).where(db.clinics.c.name == hospital)).scalar_one() is not None:
                raise Refusal(403, f"hospital {hospital!r} is revoked")
            conn.execute(insert(db.updates).values(
                update_id=upload_id, clinic=hospital, round=cur["id"], sent_round=row.round, staleness=staleness, kem=row.kem,
                blob_sha256=sha, meta={**row.meta, "norm": norm, "stream_key": row.stream_key, "size": int(row.total_size)},
                received_at=db.now()))
            conn.execute(update(db.uploads).where(u.upload_id == upload_id).values(state="complete", updated_at=db.now()))
    except IntegrityError:
        discard(srv, upload_id)
        raise Refusal(409, f"hospital {hospital!r} already sent an update for round {cur['id']}") from None
    except BaseException:  # the blob stays (content-addressed, harmless); the upload can be completed again
        _unclaim(srv, upload_id)
        raise
    path.unlink(missing_ok=True)
    log.info("stored teacher update %s (%d bytes, staleness %d)", upload_id, row.total_size, staleness,
             extra={"clinic": hospital, "round": cur["id"]})
    return Accepted("stored", upload_id, cur["id"], staleness)


def _unclaim(srv: Server, upload_id: str) -> None:
    u = db.uploads.c
    with srv.engine.begin() as conn:
        conn.execute(update(db.uploads).where(u.upload_id == upload_id, u.state == "completing").values(state="receiving"))


def _check_stream(srv: Server, row, path: Path, sha256: str) -> float:
    if sha256_file(path) != sha256:
        raise Refusal(422, f"upload {row.upload_id!r}: the received bytes' SHA-256 is not the one the hospital signed")
    info = update_info(row.clinic, row.round, row.base_version, row.upload_id, row.kem)
    expected = teacher_shapes(srv, row.base_version)
    try:
        with open(path, "rb") as fh, open_stream(fh, key=StreamKey.from_dict(row.stream_key), private=srv.hpke, info=info,
                                                 where=f"update {row.upload_id}") as plain:
            return stream_norm(plain, expected, f"update {row.upload_id}")
    except SealError as exc:
        raise Refusal(422, str(exc)) from None
    except Refusal:
        raise
    except Exception as exc:  # noqa: BLE001 - BadInput from the tensor checks, or a malformed stream
        raise Refusal(422, str(exc)[:300]) from None


def discard(srv: Server, upload_id: str) -> None:
    with srv.engine.begin() as conn:
        conn.execute(db.uploads.delete().where(db.uploads.c.upload_id == upload_id, db.uploads.c.state != "complete"))
    part_path(srv, upload_id).unlink(missing_ok=True)
