"""The server's logging: one logger per module (``logging.getLogger(__name__)``), records carrying
the request id (set per HTTP request by :class:`RequestId`), the clinic and the round (``extra=``);
``edge-server serve`` calls :func:`configure`."""

from __future__ import annotations

import logging
import sys
import uuid
from contextvars import ContextVar

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
FORMAT = "%(asctime)s %(levelname)s %(name)s req=%(request_id)s clinic=%(clinic)s round=%(round)s %(message)s"


class ContextFilter(logging.Filter):
    """Every record gets request_id, clinic and round ("-" where unknown), so the format never fails."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        for name in ("clinic", "round"):
            if not hasattr(record, name):
                setattr(record, name, "-")
        return True


def configure(level: str = "INFO", stream=None) -> None:
    """Log records of the server's and the aggregation's modules, one line each, to stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(logging.Formatter(FORMAT))
    for name in ("server", "federation"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


class RequestId:
    """ASGI middleware: a fresh id per HTTP request, in the log records and the X-Request-ID answer header."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex[:12]
        token = REQUEST_ID.set(rid)

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
