"""HTTP routes (FastAPI). Thin: every decision is in server.service / server.rounds.

    POST /v1/enroll                       token + clinic public key (signed with that key)
    GET  /v1/model                        latest version and the current round (signed)
    GET  /v1/bundle/{version}/manifest.json, /v1/bundle/{version}/files/{name}   (signed)
    POST /v1/updates                      an Envelope (signed); 200 stored or already had it
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Annotated

import anyio
from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect

from edge_runtime.bundle import MANIFEST, canonical_json
from edge_runtime.sync import protocol

from . import rounds
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

    @app.get("/v1/model")
    async def model(request: Request):
        await anyio.to_thread.run_sync(srv.authenticate, request.headers, "GET", request.url.path, await read_body(request))
        return await anyio.to_thread.run_sync(srv.status)

    @app.get("/v1/bundle/{version}/manifest.json")
    async def manifest(version: Version, request: Request):
        await anyio.to_thread.run_sync(srv.authenticate, request.headers, "GET", request.url.path, await read_body(request))
        return Response(canonical_json(srv.manifest(version)), media_type="application/json")

    @app.get("/v1/bundle/{version}/files/{name:path}")
    async def bundle_file(version: Version, name: str, request: Request):
        await anyio.to_thread.run_sync(srv.authenticate, request.headers, "GET", request.url.path, await read_body(request))
        files = srv.manifest(version)["files"]
        if name == MANIFEST or name not in files:
            raise Refusal(404, f"version {version} has no file {name!r}")
        return Response(srv.blobs.get(files[name]["sha256"]), media_type="application/octet-stream")

    @app.post("/v1/updates")
    async def upload(request: Request):
        body = await read_body(request)
        clinic, key = await anyio.to_thread.run_sync(srv.authenticate, request.headers, "POST", request.url.path, body)
        env = protocol.Envelope(**parse(EnvelopeBody, body).model_dump())
        accepted = await anyio.to_thread.run_sync(srv.receive_update, clinic, key, env)
        if accepted.status == "stored":
            wake.set()  # the round may be due now
        return {"status": accepted.status, "update_id": accepted.update_id, "round": accepted.round,
                "staleness": accepted.staleness}

    return app
