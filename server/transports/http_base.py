"""What every HTTP route shares: error bodies from the error table, request ids, bounded body reads,
and deadlines (the ASGI middleware, request id, auth and disconnect watch in one, is
``transports/middleware.py``).

The typed API (``http_api``), the Open Inference Protocol routes (``oip_http``) and the
middleware all answer errors through ``error_response``: one body, ``{"error": {"code",
"message"}}``, one status per code (``core.errors.ERROR_TABLE``).
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from hybridserve.server.core.errors import ERROR_TABLE, HybridServeError, InvalidInput, PayloadTooLarge
from hybridserve.server.core.settings import Settings
from hybridserve.server.observability.logs import new_request_id, request_id_from


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
