"""Typed errors and the one table that maps each to an HTTP status and a gRPC code.

Every API (typed HTTP, Open Inference Protocol over HTTP and gRPC, typed gRPC) turns a
``HybridServeError`` into a response through ``ERROR_TABLE``; nothing else decides a status.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorKind:
    code: str
    http_status: int
    grpc_status: str  # the name of a grpc.StatusCode (this module imports no transport)


class HybridServeError(Exception):
    """Base of every error a client may see. Subclasses fix ``code``; ``message`` says what to fix."""

    code = "internal"
    retry_after_default: float | None = None  # the Retry-After (seconds) of the transient kinds

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after = self.retry_after_default if retry_after is None else retry_after

    def __reduce__(self):  # survives pickling across Ray processes with its keyword
        return (_rebuild, (type(self), self.message, self.retry_after))

    @property
    def kind(self) -> ErrorKind:
        return ERROR_TABLE[self.code]


def _rebuild(cls, message, retry_after):
    return cls(message, retry_after=retry_after)


class InvalidInput(HybridServeError):
    code = "invalid_input"


class WrongTask(HybridServeError):
    code = "wrong_task"


class Unauthenticated(HybridServeError):
    code = "unauthenticated"


class ModelNotFound(HybridServeError):
    code = "model_not_found"


class PayloadTooLarge(HybridServeError):
    code = "payload_too_large"


class UnsupportedMediaType(HybridServeError):
    code = "unsupported_media_type"


class UnprocessableImage(HybridServeError):
    code = "unprocessable_image"


class Overloaded(HybridServeError):
    code = "overloaded"
    retry_after_default = 1.0


class ModelNotReady(HybridServeError):
    code = "model_not_ready"
    retry_after_default = 1.0


class DeadlineExceeded(HybridServeError):
    code = "deadline_exceeded"
    retry_after_default = 1.0


class InternalError(HybridServeError):
    code = "internal"


ERROR_TABLE: dict[str, ErrorKind] = {
    kind.code: kind
    for kind in (
        ErrorKind("invalid_input", 400, "INVALID_ARGUMENT"),
        ErrorKind("wrong_task", 400, "INVALID_ARGUMENT"),
        ErrorKind("unauthenticated", 401, "UNAUTHENTICATED"),
        ErrorKind("model_not_found", 404, "NOT_FOUND"),
        ErrorKind("payload_too_large", 413, "INVALID_ARGUMENT"),
        ErrorKind("unsupported_media_type", 415, "INVALID_ARGUMENT"),
        ErrorKind("unprocessable_image", 422, "INVALID_ARGUMENT"),
        ErrorKind("overloaded", 503, "RESOURCE_EXHAUSTED"),
        ErrorKind("model_not_ready", 503, "UNAVAILABLE"),
        ErrorKind("deadline_exceeded", 504, "DEADLINE_EXCEEDED"),
        ErrorKind("internal", 500, "INTERNAL"),
    )
}

ERROR_CLASSES: dict[str, type[HybridServeError]] = {
    cls.code: cls
    for cls in (
        InvalidInput, WrongTask, Unauthenticated, ModelNotFound, PayloadTooLarge, UnsupportedMediaType,
        UnprocessableImage, Overloaded, ModelNotReady, DeadlineExceeded, InternalError,
    )
}


def as_hybridserve_error(exc: BaseException) -> HybridServeError:
    """Unwrap Ray's wrappers; anything that is not ours becomes an InternalError without leaking details."""
    seen = exc
    for _ in range(4):
        if isinstance(seen, HybridServeError):
            return seen
        cause = getattr(seen, "cause", None) or seen.__cause__
        if cause is None:
            break
        seen = cause
    return InternalError(f"internal error ({type(exc).__name__}); see server logs")
