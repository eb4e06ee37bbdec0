"""The teacher federation on the server (DESIGN §10): publishing the first global teacher, reading
a version's parameters, and aggregating a round of hospitals' streamed updates into the next version.

Memory: an update is never held whole while it arrives (server.uploads). At aggregation each update
is decrypted and parsed as a stream, one at a time, into the same pure function the head federation
and the simulation use (federation.aggregation): the global teacher, the float64 accumulator and one
update's delta: O(model), whatever the number of hospitals.
"""

from __future__ import annotations

import json
import logging
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from sqlalchemy import update

from edge_runtime.errors import BadInput
from edge_runtime.sync.hpke import update_info
from federation import teacher as fmt
from federation.aggregation import ClientUpdate, UpdateMeta
from federation.sealed_stream import StreamKey, open_stream
from federation.tensor_stream import iter_tensors, shapes, write_tensors

from . import db
from .rounds import Publication, aggregation_report, saved_state
from .service import Refusal, Server, StoredBlob

log = logging.getLogger(__name__)


def publish_teacher(srv: Server, folder: Path) -> tuple[int, int]:
    """The first global teacher (``edge-export teacher-init`` writes the folder): its shared
    parameters, the hospitals' starting normalisation layers and its spec, checked (float32, finite,
    the spec naming the local tensors), signed as the next version; the open teacher round, if any,
    is superseded and a new one opened on it."""
    folder = Path(folder)
    paths = {name: folder / name for name in fmt.FILES}
    for name, path in paths.items():
        if not path.is_file():
            raise BadInput(f"{path}: missing (a teacher folder holds {', '.join(fmt.FILES)})")
    try:
        spec = fmt.TeacherSpec.from_dict(json.loads(paths[fmt.SPEC].read_text()), str(paths[fmt.SPEC]))
    except ValueError as exc:
        raise BadInput(f"{paths[fmt.SPEC]}: not JSON ({exc})") from None
    for name in (fmt.WEIGHTS, fmt.LOCAL_INIT):
        with open(paths[name], "rb") as fh:
            tensors = dict((n, a.shape) for n, a in iter_tensors(fh, None, str(paths[name])))  # every value finite
        if name == fmt.LOCAL_INIT and sorted(tensors) != sorted(spec.local_tensors):
            raise BadInput(f"{paths[name]}: its tensors differ from {fmt.SPEC}'s local_tensors")
        if name == fmt.WEIGHTS:
            weights = tensors
    files = {}
    for name, path in paths.items():
        tmp = srv.blobs.temp()
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        files[name] = StoredBlob(*srv.blobs.put_file(tmp))
    parameters = int(sum(int(np.prod(s)) for s in weights.values()))
    body = {"kind": "teacher", "model_version": f"teacher-{spec.config}-{files[fmt.WEIGHTS].sha256[:12]}",
            "teacher": {"config": spec.config, "tensors": len(weights), "parameters": parameters}}
    with srv.engine.begin() as conn:
        version = srv.publish_manifest(body, files, None, conn, federation="teacher")
        conn.execute(update(db.rounds).where(db.rounds.c.state == "open", db.rounds.c.federation == "teacher")
                     .values(state="closed", closed_at=db.now(), report={"superseded_by": version}))
        rid = srv.open_round(conn, version, "teacher")
    log.info("published teacher version %d (%d tensors, %d parameters); round %d open", version, len(weights), parameters, rid)
    return version, rid


def weights_path(srv: Server, version: int) -> Path:
    manifest = srv.manifest(version)
    if manifest.get("kind") != "teacher":
        raise Refusal(404, f"version {version} is not a teacher version")
    return srv.blobs.path(manifest["files"][fmt.WEIGHTS]["sha256"])


@lru_cache(maxsize=16)
def _shapes_at(path: str) -> dict[str, tuple[int, ...]]:
    return shapes(path)


def teacher_shapes(srv: Server, version: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a teacher version's shared parameters: what its updates must match."""
    return _shapes_at(str(weights_path(srv, version)))


def teacher_params(srv: Server, version: int) -> dict[str, np.ndarray]:
    with open(weights_path(srv, version), "rb") as fh:
        return {name: array.copy() for name, array in iter_tensors(fh, None, f"teacher version {version}")}


def opened_update(srv: Server, *, blob_sha256: str, meta: dict, clinic: str, sent_round: int, sent_base: int,
                  update_id: str, kem: str, expected: dict) -> dict[str, np.ndarray]:
    """A stored teacher update decrypted and parsed as it is read (the checks of tensor_stream)."""
    info = update_info(clinic, sent_round, sent_base, update_id, kem)
    key = StreamKey.from_dict(meta["stream_key"])
    with open(srv.blobs.path(blob_sha256), "rb") as fh, \
            open_stream(fh, key=key, private=srv.hpke, info=info, where=f"update {update_id}") as plain:
        return {name: array.copy() for name, array in iter_tensors(plain, expected, f"update {update_id}")}


def teacher_version(srv: Server, rnd, rows) -> Publication:
    """The teacher federation's new version: the aggregate of the round's updates as teacher.safetensors,
    the other files of the base version as they are."""
    base = srv.manifest(rnd.base_version)
    global_params = teacher_params(srv, rnd.base_version)
    expected = {k: v.shape for k, v in global_params.items()}
    updates = []
    for row in rows:
        meta = UpdateMeta(client=row.clinic, n=int(row.meta["n"]), val_loss=float(row.meta["val_loss"]),
                          modality_fraction=row.meta.get("modality_fraction") or {}, staleness=int(row.staleness),
                          noise_multiplier=float(row.meta.get("noise_multiplier", 0.0)))

        def load(row=row) -> dict:
            return opened_update(srv, blob_sha256=row.blob_sha256, meta=row.meta, clinic=row.clinic, sent_round=row.sent_round,
                                 sent_base=row.sent_base, update_id=row.update_id, kem=row.kem, expected=expected)

        updates.append(ClientUpdate(meta, float(row.meta["norm"]), load))
    strategy = srv.strategy_for(global_params, saved_state(srv, rnd.base_version, "teacher"), "teacher")
    result = strategy.aggregate(global_params, updates, fmt.branch_of)
    del global_params
    report = aggregation_report(srv, result, strategy)
    tmp = srv.blobs.temp("teacher")
    with open(tmp, "wb") as fh:
        write_tensors(fh, result.params)
        fh.flush()
        os.fsync(fh.fileno())
    files = {name: StoredBlob(meta["sha256"], meta["size"]) for name, meta in base["files"].items()}
    files[fmt.WEIGHTS] = StoredBlob(*srv.blobs.put_file(tmp))
    root_version = str(base.get("federation", {}).get("root_model_version", base["model_version"]))
    body = {k: v for k, v in base.items() if k not in ("signature", "files", "server_version")}
    body["model_version"] = f"{root_version}+fl.r{rnd.id}"
    body["federation"] = {"root_model_version": root_version, "round": rnd.id, "base_version": rnd.base_version,
                          "clients": result.accepted, "weights": result.weights.get("shared", {})}
    return Publication(body, files, report)
