"""Every error the client raises, one class per server error code.

The tree (catch a branch to handle all of its leaves)::

    HybridServeError                     code, message, status, request_id, retry_after
    ├── InvalidInput          400 invalid_input        the request cannot be served as sent
    │   ├── WrongTask         400 wrong_task           e.g. detect() on a classification model
    │   ├── PayloadTooLarge   413 payload_too_large    the body exceeds the server's limit
    │   ├── UnsupportedMediaType 415 unsupported_media_type
    │   └── UnprocessableImage   422 unprocessable_image  bytes that do not decode as an image
    ├── Unauthenticated       401 unauthenticated      missing or wrong API key / token (also 403)
    ├── ModelNotFound         404 model_not_found      no model of that name (also an unknown route)
    ├── Unavailable           503                      the server cannot serve now: RETRIED
    │   ├── Overloaded        503/429 overloaded       queue full; honours Retry-After
    │   ├── ModelNotReady     503 model_not_ready      the model is loading or failed
    │   └── ConnectionFailed  -                        no response: refused, reset, DNS, TLS
    ├── Timeout               504 deadline_exceeded    server deadline, or no answer within the client timeout
    └── ServerError           500 internal             any other 5xx

Only ``Unavailable`` and its subclasses are retried (``retryable`` is True). Over gRPC the
status codes map to the same classes (INVALID_ARGUMENT -> InvalidInput unless the trailing
metadata ``hybridserve-error-code`` names a finer code, NOT_FOUND -> ModelNotFound, RESOURCE_EXHAUSTED ->
Overloaded, UNAVAILABLE -> Unavailable, DEADLINE_EXCEEDED -> Timeout, UNAUTHENTICATED ->
Unauthenticated, anything else -> ServerError).
"""

from __future__ import annotations

import json
from typing import Any


class HybridServeError(Exception):
    """Base of every client error. ``code`` is the server's stable error code."""

    code = "error"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 request_id: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.status = status
        self.request_id = request_id
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f", request {self.request_id}" if self.request_id else ""
        status = f"{self.status} " if self.status else ""
        return f"{self.message} ({status}{self.code}{where})"


class InvalidInput(HybridServeError):
    code = "invalid_input"


class WrongTask(InvalidInput):
    code = "wrong_task"


class PayloadTooLarge(InvalidInput):
    code = "payload_too_large"


class UnsupportedMediaType(InvalidInput):
    code = "unsupported_media_type"


class UnprocessableImage(InvalidInput):
    code = "unprocessable_image"


class Unauthenticated(HybridServeError):
    code = "unauthenticated"


class ModelNotFound(HybridServeError):
    code = "model_not_found"


class Unavailable(HybridServeError):
    code = "unavailable"
    retryable = True


class Overloaded(Unavailable):
    code = "overloaded"


class ModelNotReady(Unavailable):
    code = "model_not_ready"


class ConnectionFailed(Unavailable):
    code = "connection_failed"


class Timeout(HybridServeError):
    code = "deadline_exceeded"


class ServerError(HybridServeError):
    code = "internal"


ERROR_CLASSES: dict[str, type[HybridServeError]] = {
    cls.code: cls
    for cls in (InvalidInput, WrongTask, PayloadTooLarge, UnsupportedMediaType, UnprocessableImage,
                Unauthenticated, ModelNotFound, Unavailable, Overloaded, ModelNotReady, ConnectionFailed,
                Timeout, ServerError)
}

# When a response carries no known code, its HTTP status decides.
_BY_STATUS: dict[int, type[HybridServeError]] = {
    400: InvalidInput, 401: Unauthenticated, 403: Unauthenticated, 404: ModelNotFound, 413: PayloadTooLarge,
    415: UnsupportedMediaType, 422: UnprocessableImage, 429: Overloaded, 503: Unavailable, 504: Timeout,
}


def error_from_http(status: int, body: bytes, headers: Any, request_id: str | None = None) -> HybridServeError:
    """The exception for an HTTP error response (``headers`` is any case-insensitive mapping)."""
    code, message = None, None
    try:
        error = json.loads(body)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode("utf-8", "replace").strip() or f"HTTP {status}"
    cls = ERROR_CLASSES.get(code or "") or _BY_STATUS.get(status) or (
        ServerError if status >= 500 else HybridServeError)
    if status == 429:
        cls = Overloaded
    return cls(message, code=code, status=status, request_id=request_id or headers.get("x-request-id"),
               retry_after=_retry_after(headers.get("retry-after")))


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the delta-seconds form; an HTTP date is ignored)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


# gRPC status code names (grpc.StatusCode.X.name) -> class, used when metadata carries no code.
_BY_GRPC_STATUS: dict[str, type[HybridServeError]] = {
    "INVALID_ARGUMENT": InvalidInput, "FAILED_PRECONDITION": InvalidInput, "OUT_OF_RANGE": InvalidInput,
    "NOT_FOUND": ModelNotFound, "RESOURCE_EXHAUSTED": Overloaded, "UNAVAILABLE": Unavailable,
    "DEADLINE_EXCEEDED": Timeout, "UNAUTHENTICATED": Unauthenticated, "PERMISSION_DENIED": Unauthenticated,
}


GRPC_ERROR_CODE_KEY = "hybridserve-error-code"


def error_from_grpc(status_name: str, details: str, metadata: dict[str, str],
                    request_id: str | None = None) -> HybridServeError:
    """The exception for a failed gRPC call: the ``hybridserve-error-code`` trailer wins over the status."""
    code = metadata.get(GRPC_ERROR_CODE_KEY)
    cls = ERROR_CLASSES.get(code or "") or _BY_GRPC_STATUS.get(status_name, ServerError)
    return cls(details or status_name, code=code, status=None,
               request_id=request_id or metadata.get("x-request-id"),
               retry_after=_retry_after(metadata.get("retry-after")))
