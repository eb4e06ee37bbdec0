"""HTTP routes (FastAPI). Thin: every decision is in server.service / server.rounds.

    POST /v1/enroll                       token + clinic public key (signed with that key)
    GET  /v1/model                        latest version and the current round (signed)
    GET  /v1/bundle/{version}/manifest.json, /v1/bundle/{version}/files/{name}   (signed)
    POST /v1/updates                      an Envelope (signed); 200 stored or already had it
    GET  /v1/teacher                      latest teacher version and the current teacher round (hospitals)
    POST /v1/teacher/uploads, PUT /v1/teacher/uploads/{id}/{index}, GET /v1/teacher/uploads/{id},
    POST /v1/teacher/uploads/{id}/complete   a chunked, resumable teacher update (server.uploads)

A version is read by the tier that trains its federation: head bundles by clinics, teachers by
hospitals; head updates only from clinics, teacher updates only from hospitals (403 otherwise).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Annotated

import anyio
from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect

from edge_runtime.bundle import MANIFEST, canonical_json
from edge_runtime.sync import protocol

from . import db, rounds, uploads
from .logs import RequestId
from .service import Refusal, Server

log = logging.getLogger(__name__)
SMALL_BODY = 64 * 2**10  # uvicorn buffers this much per connection anyway: reading it needs no permit
ENROLL_MAX_BODY = 4 * 2**10  # a token (at most 400 characters) and a public key (100) as JSON


# Rounds and versions are INTEGER columns: 32-bit on PostgreSQL, so larger ids are refused here
# (422) rather than reaching the database (an overflow there was an HTTP 500).
DB_INT_MAX = 2**31 - 1
Version = Annotated[int, Path(ge=1, le=DB_INT_MAX)]


class EnrollBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(max_length=400)
    public_key: str = Field(max_length=100)


class EnvelopeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    update_id: str = Field(min_length=1, max_length=128)
    clinic: str = Field(min_length=1, max_length=64)
    round: int = Field(ge=1, le=DB_INT_MAX)
    base_version: int = Field(ge=1, le=DB_INT_MAX)
    kem: str = Field(max_length=32)
    sealed: str
    signature: str = Field(max_length=200)


class UploadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    update_id: str = Field(min_length=1, max_length=128)
    round: int = Field(ge=1, le=DB_INT_MAX)
    base_version: int = Field(ge=1, le=DB_INT_MAX)
    kem: str = Field(max_length=32)
    stream_key: dict
    total_size: int = Field(ge=1, le=2**62)
    meta: dict


class CompleteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


UploadId = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
ChunkIndex = Annotated[int, Path(ge=0, le=DB_INT_MAX)]


def peer(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "?"


def refuse(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


def create_app(srv: Server, tick_seconds: float = 2.0) -> FastAPI:
    app = FastAPI(title="dwfl-edge aggregation server", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestId)
    stop, wake = threading.Event(), threading.Event()

    def loop() -> None:
        # One thread for the rounds, woken early by a stored update (no thread per update: thread
        # churn fragments the allocator's per-thread arenas and the server's memory creeps up)
        forgot = time.monotonic()
        while not stop.is_set():
            wake.wait(tick_seconds)
            wake.clear()
            if stop.is_set():
                return
            try:
                rounds.tick(srv)  # a round that cannot be aggregated is closed as failed there, not retried here
                if time.monotonic() - forgot >= tick_seconds:
                    srv.forget_old_nonces()
                    forgot = time.monotonic()
            except Exception:  # noqa: BLE001 - the database is unreachable, say: keep serving, log it
                log.exception("round check failed")

    @app.on_event("startup")
    def _start() -> None:
        threading.Thread(target=loop, daemon=True, name="rounds").start()

    @app.on_event("shutdown")
    def _stop() -> None:
        stop.set()
        wake.set()

    large_reads = anyio.Semaphore(srv.config.body_reads)
    reading: set[str] = set()  # clinics with a large body being read (one event loop: no lock needed)

    async def read_body(request: Request, *, enrollment: bool = False) -> bytes:
        """The request's body, once what can be refused without it was: the signature headers and
        the clinic (an enrollment: the headers only, and a few KiB at most). A body above SMALL_BODY
        (or of unknown length) is read under one of `body_reads` permits, waited for at most
        `body_wait_s` (then 503: the client retries later): unauthenticated bytes held in memory
        stay bounded. A body must arrive at `body_min_rate` bytes/s (after `body_grace_s`), else 408."""
        if enrollment:
            try:
                protocol.check_request_headers(request.headers, max_skew=srv.config.max_skew_s)
            except protocol.AuthError as exc:
                raise Refusal(401, f"enrollment refused: {exc}") from None
        else:
            await anyio.to_thread.run_sync(srv.precheck, request.headers)
        limit = ENROLL_MAX_BODY if enrollment else srv.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise Refusal(413, f"body larger than {limit} bytes")
        size = int(declared) if declared is not None else (limit if "transfer-encoding" in request.headers else 0)
        if size <= SMALL_BODY:
            return await receive_body(request, limit, size)
        # One large read per claimed clinic: the name is checked before the body (its signature
        # after), so whoever knows one enrolled name holds at most one permit, never all of them.
        claimed = request.headers.get(protocol.H_CLINIC, "")
        if claimed in reading:
            raise Refusal(503, f"clinic {claimed[:64]!r} is already sending an upload; retry shortly")
        reading.add(claimed)
        try:
            try:
                with anyio.fail_after(srv.config.body_wait_s):
                    await large_reads.acquire()
            except TimeoutError:
                raise Refusal(503, "server busy reading other uploads; retry shortly") from None
            try:
                return await receive_body(request, limit, size)
            finally:
                large_reads.release()
        finally:
            reading.discard(claimed)

    async def receive_body(request: Request, limit: int, size: int) -> bytes:
        body = bytearray()
        try:
            with anyio.fail_after(srv.config.body_grace_s + size / srv.config.body_min_rate):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limit:
                        raise Refusal(413, f"body larger than {limit} bytes")
        except ClientDisconnect:
            log.warning("%s %s from %s: client disconnected after %d of %s body bytes", request.method, request.url.path,
                        peer(request), len(body), request.headers.get("content-length", "?"))
            raise Refusal(400, "client disconnected during the body", logged=True) from None  # nobody reads this answer
        except TimeoutError:
            log.warning("%s %s from %s: body too slow, %d of %s bytes; connection closed", request.method, request.url.path,
                        peer(request), len(body), request.headers.get("content-length", "?"))
            raise Refusal(408, f"body arrived slower than {srv.config.body_min_rate} bytes/s", logged=True) from None
        return bytes(body)

    @app.exception_handler(Refusal)
    async def _refusal(request: Request, exc: Refusal) -> JSONResponse:
        if not exc.logged:
            log.info("refused %s %s: %d %s", request.method, request.url.path, exc.status, exc.reason,
                     extra={"clinic": (request.headers.get(protocol.H_CLINIC) or "-")[:64]})
        resp = refuse(exc.status, exc.reason)
        if exc.status == 408:  # a sender that slow is not waited for again on this connection
            resp.headers["Connection"] = "close"
        return resp

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]  # a route parameter (e.g. {version}) out of range: same JSON shape as a Refusal
        where = ".".join(str(x) for x in first.get("loc", ())) or "request"
        return refuse(422, f"malformed request: {where}: {first.get('msg')}")

    def parse(model, body: bytes):
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ())) or "body"
            raise Refusal(422, f"malformed request body: {where}: {first.get('msg')}") from None

    @app.post("/v1/enroll")
    async def enroll(request: Request):
        body = await read_body(request, enrollment=True)
        req = parse(EnrollBody, body)
        return await anyio.to_thread.run_sync(srv.enroll, request.headers, "POST", request.url.path, body, req.token, req.public_key)

    async def signed(request: Request, tier: str | None, body: bytes | None = None) -> str:
        body = await read_body(request) if body is None else body
        return (await anyio.to_thread.run_sync(srv.authenticate, request.headers, request.method, request.url.path, body, tier))[0]

    @app.get("/v1/model")
    async def model(request: Request):
        await signed(request, "clinic")
        return await anyio.to_thread.run_sync(srv.status)

    @app.get("/v1/teacher")
    async def teacher(request: Request):
        await signed(request, "hospital")
        return await anyio.to_thread.run_sync(srv.status, "teacher")

    async def version_for(request: Request, version: int):
        """The version's manifest, for the tier that trains its federation only."""
        name = await signed(request, None)
        row = await anyio.to_thread.run_sync(srv.version_row, version)
        tier = db.FEDERATIONS[row.federation]
        if await anyio.to_thread.run_sync(srv.tier_of, name) != tier:
            raise Refusal(403, f"version {version} belongs to the {row.federation} federation: for {tier}s only")
        return await anyio.to_thread.run_sync(srv.manifest, version)

    @app.get("/v1/bundle/{version}/manifest.json")
    async def manifest(version: Version, request: Request):
        return Response(canonical_json(await version_for(request, version)), media_type="application/json")

    @app.get("/v1/bundle/{version}/files/{name:path}")
    async def bundle_file(version: Version, name: str, request: Request):
        files = (await version_for(request, version))["files"]
        if name == MANIFEST or name not in files:
            raise Refusal(404, f"version {version} has no file {name!r}")
        path = srv.blobs.path(files[name]["sha256"])  # streamed from disk (a teacher is ~160 MB); the client checks the hash
        if not path.is_file():
            raise Refusal(500, f"version {version}: file {name!r} is missing from the blob store")
        return FileResponse(path, media_type="application/octet-stream")

    @app.post("/v1/teacher/uploads")
    async def upload_begin(request: Request):
        body = await read_body(request)
        hospital = await signed(request, "hospital", body)
        req = uploads.UploadStart(**parse(UploadBody, body).model_dump())
        return await anyio.to_thread.run_sync(uploads.begin, srv, hospital, req)

    @app.get("/v1/teacher/uploads/{upload_id}")
    async def upload_status(upload_id: UploadId, request: Request):
        hospital = await signed(request, "hospital")
        return await anyio.to_thread.run_sync(uploads.status, srv, hospital, upload_id)

    @app.put("/v1/teacher/uploads/{upload_id}/{index}")
    async def upload_chunk(upload_id: UploadId, index: ChunkIndex, request: Request):
        body = await read_body(request)
        hospital = await signed(request, "hospital", body)
        return await anyio.to_thread.run_sync(uploads.chunk, srv, hospital, upload_id, index, body)

    @app.post("/v1/teacher/uploads/{upload_id}/complete")
    async def upload_complete(upload_id: UploadId, request: Request):
        body = await read_body(request)
        hospital = await signed(request, "hospital", body)
        done = await anyio.to_thread.run_sync(uploads.complete, srv, hospital, upload_id, parse(CompleteBody, body).sha256)
        if done.status == "stored":
            wake.set()
        return {"status": done.status, "update_id": done.update_id, "round": done.round, "staleness": done.staleness}

    @app.post("/v1/updates")
    async def upload(request: Request):
        body = await read_body(request)
        clinic, key = await anyio.to_thread.run_sync(srv.authenticate, request.headers, "POST", request.url.path, body, "clinic")
        env = protocol.Envelope(**parse(EnvelopeBody, body).model_dump())
        accepted = await anyio.to_thread.run_sync(srv.receive_update, clinic, key, env)
        if accepted.status == "stored":
            wake.set()  # the round may be due now
        return {"status": accepted.status, "update_id": accepted.update_id, "round": accepted.round,
                "staleness": accepted.staleness}

    return app
