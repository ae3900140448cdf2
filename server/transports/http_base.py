"""What every HTTP route shares: error bodies from the error table, request ids, bounded body reads,
deadlines, and the two ASGI middlewares of the in-process server (the request id; cancellation of a
request whose client disconnects).

The typed API (``http_api``), the Open Inference Protocol routes (``oip_http``) and the auth
middleware all answer errors through ``error_response``: one body, ``{"error": {"code",
"message"}}``, one status per code (``core.errors.ERROR_TABLE``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders

from hybridserve.server.core.errors import ERROR_TABLE, HybridServeError, InvalidInput, PayloadTooLarge
from hybridserve.server.core.settings import Settings
from hybridserve.server.observability import metrics
from hybridserve.server.observability.logs import (
    bind_request_id, new_request_id, release_request_id, request_id_from,
)

log = logging.getLogger("hybridserve.http")


def error_response(exc: HybridServeError, request_id: str | None = None) -> JSONResponse:
    kind = ERROR_TABLE[exc.code]
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if request_id:
        headers["X-Request-ID"] = request_id
    body = {"error": {"code": exc.code, "message": exc.message}}
    return JSONResponse(body, status_code=kind.http_status, headers=headers)


def request_id_of(request: Request) -> str:
    return request_id_from(request.headers.get("x-request-id"), request.headers.get("traceparent")) or new_request_id()


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def request_timeout(request: Request, settings: Settings) -> float:
    raw = request.headers.get("x-request-timeout")
    if raw is None:
        return settings.request_timeout_s
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput("X-Request-Timeout must be a number of seconds") from None
    if not 0 < value <= settings.max_timeout_s:
        raise InvalidInput(f"X-Request-Timeout must be in (0, {settings.max_timeout_s:g}] seconds")
    return value


class HTTPMiddleware:
    """An ASGI middleware that acts on HTTP requests (``handle``) and passes anything else through."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: dict, receive: Any, send: Any) -> None:
        raise NotImplementedError


class RequestIdMiddleware(HTTPMiddleware):
    """In-process counterpart of Ray Serve's proxy: settle the request id, hand it on, and return it.

    The id goes into the request's ``x-request-id`` header (so handlers read one value), tags every
    log line of the request, and leaves in the response's ``X-Request-ID``.
    """

    async def handle(self, scope: dict, receive: Any, send: Any) -> None:
        headers = MutableHeaders(scope=scope)
        request_id = request_id_from(headers.get("x-request-id"), headers.get("traceparent")) or new_request_id()
        headers["x-request-id"] = request_id

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                answer = MutableHeaders(scope=message)
                if "x-request-id" not in answer:
                    answer.append("X-Request-ID", request_id)
            await send(message)

        token = bind_request_id(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            release_request_id(token)


class CancelOnDisconnect(HTTPMiddleware):
    """ASGI middleware: cancel a request's task when its client disconnects before the answer starts.

    uvicorn never cancels an app on its own. Once the app has read the whole body, a watcher waits
    on ``receive()``, which the server then answers only with ``http.disconnect`` (client gone, or
    the response complete). A cancelled request leaves no answer, a 499 in the request log and
    metrics, and no error; its queued items are dropped before compute (``ModelRuntime.infer``).
    """

    async def handle(self, scope: dict, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        watcher: asyncio.Task | None = None
        responding = client_gone = False

        async def watch() -> dict:
            nonlocal client_gone
            message = await receive()
            if message["type"] == "http.disconnect" and not responding:
                client_gone = True
                task.cancel()
            return message

        async def receive_then_watch() -> dict:
            nonlocal watcher
            if watcher is not None:  # the app reads past its body: the next message is the watcher's
                return await asyncio.shield(watcher)
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                watcher = asyncio.create_task(watch())
            return message

        async def send_noting_start(message: dict) -> None:
            nonlocal responding
            responding = responding or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive_then_watch, send_noting_start)
        except asyncio.CancelledError:
            metrics.request_cancelled()
            if client_gone and task.uncancel() == 0:  # only this watcher cancelled it: nothing more to do
                log.debug("client disconnected before the answer: request cancelled")
                return
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
