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

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_runtime.bundle import MANIFEST, canonical_json
from edge_runtime.sync import protocol

from . import rounds
from .logs import RequestId
from .service import Refusal, Server

log = logging.getLogger(__name__)


class EnrollBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(max_length=400)
    public_key: str = Field(max_length=100)


class EnvelopeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    update_id: str = Field(min_length=1, max_length=128)
    clinic: str = Field(min_length=1, max_length=64)
    round: int = Field(ge=1)
    base_version: int = Field(ge=1)
    kem: str = Field(max_length=32)
    sealed: str
    signature: str = Field(max_length=200)


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

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > srv.config.max_body_bytes):
            raise Refusal(413, f"body larger than {srv.config.max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > srv.config.max_body_bytes:
                raise Refusal(413, f"body larger than {srv.config.max_body_bytes} bytes")
        return bytes(body)

    @app.exception_handler(Refusal)
    async def _refusal(request: Request, exc: Refusal) -> JSONResponse:
        log.info("refused %s %s: %d %s", request.method, request.url.path, exc.status, exc.reason,
                 extra={"clinic": (request.headers.get(protocol.H_CLINIC) or "-")[:64]})
        return refuse(exc.status, exc.reason)

    def parse(model, body: bytes):
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ())) or "body"
            raise Refusal(422, f"malformed request body: {where}: {first.get('msg')}") from None

    @app.post("/v1/enroll")
    async def enroll(request: Request):
        body = await read_body(request)
        req = parse(EnrollBody, body)
        return await anyio.to_thread.run_sync(srv.enroll, request.headers, "POST", request.url.path, body, req.token, req.public_key)

    @app.get("/v1/model")
    async def model(request: Request):
        await anyio.to_thread.run_sync(srv.authenticate, request.headers, "GET", request.url.path, await read_body(request))
        return await anyio.to_thread.run_sync(srv.status)

    @app.get("/v1/bundle/{version}/manifest.json")
    async def manifest(version: int, request: Request):
        await anyio.to_thread.run_sync(srv.authenticate, request.headers, "GET", request.url.path, await read_body(request))
        return Response(canonical_json(srv.manifest(version)), media_type="application/json")

    @app.get("/v1/bundle/{version}/files/{name:path}")
    async def bundle_file(version: int, name: str, request: Request):
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
