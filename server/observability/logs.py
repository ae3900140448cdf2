"""Structured logs: a request id on every line about a request, one INFO line per request, JSON optional.

The request id comes from ``X-Request-ID`` (or a W3C ``traceparent``'s trace id) or is generated;
HTTP's ``RequestMiddleware`` (``transports/middleware.py``) settles it in-process; under Ray Serve the proxy has already settled it and carries it to every replica in Serve's request
context, which ``current_request_id`` falls back to. ``configure_logging`` installs one handler on
the ``hybridserve`` logger: text (default) or JSON lines (``--log-format json`` or
``HYBRIDSERVE_LOG_FORMAT=json``). Request lines carry names, statuses and timings, never image data.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any

LOG_FORMAT_ENV = "HYBRIDSERVE_LOG_FORMAT"
LOG_FORMATS = ("text", "json")
ROOT_LOGGER = "hybridserve"

request_log = logging.getLogger("hybridserve.requests")
_request_id: ContextVar[str | None] = ContextVar("hybridserve_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request this code runs for: ours, else Ray Serve's request context, else None."""
    given = _request_id.get()
    if given:
        return given
    if "ray.serve" not in sys.modules:
        return None
    try:
        from ray.serve import context

        return context._get_serve_request_context().request_id or None
    except Exception:  # not inside a Serve replica
        return None


def request_id_from(x_request_id: str | None, traceparent: str | None) -> str | None:
    """The id a client gave: a sane ``X-Request-ID``, else a W3C ``traceparent``'s trace id, else None."""
    if x_request_id and len(x_request_id) <= 128 and x_request_id.isprintable():
        return x_request_id
    parts = (traceparent or "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32:
        return parts[1]
    return None


def new_request_id() -> str:
    return uuid.uuid4().hex


def grpc_request_id(context: Any) -> str:
    """A gRPC call's id: its ``x-request-id`` (or ``traceparent``) metadata, else Ray Serve's ``request_id``."""
    metadata = dict(context.invocation_metadata()) if context is not None else {}
    given = request_id_from(metadata.get("x-request-id"), metadata.get("traceparent"))
    return given or current_request_id() or new_request_id()


def bind_request_id(request_id: str | None) -> Token:
    """Tag what this task logs from now on with ``request_id``, until ``release_request_id``."""
    return _request_id.set(request_id)


def release_request_id(token: Token) -> None:
    try:
        _request_id.reset(token)
    except ValueError:  # finished in another context than it started: leave that context alone
        pass


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = current_request_id() or "-"
        return True


class JSONLinesFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        line.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [request id] message key=value ...``."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            text += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        return text


def log_format(requested: str | None = None) -> str:
    chosen = (requested or os.environ.get(LOG_FORMAT_ENV) or "text").lower()
    if chosen not in LOG_FORMATS:
        raise ValueError(f"log format {chosen!r} is not one of {', '.join(LOG_FORMATS)}")
    return chosen


def configure_logging(requested: str | None = None, level: int = logging.INFO) -> str:
    """Give the ``hybridserve`` loggers one stderr handler in the chosen format; returns the format."""
    chosen = log_format(requested)
    logger = logging.getLogger(ROOT_LOGGER)
    for handler in list(logger.handlers):
        if getattr(handler, "hybridserve_handler", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.hybridserve_handler = True  # type: ignore[attr-defined]
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JSONLinesFormatter() if chosen == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return chosen


def log_request(fields: dict[str, Any]) -> None:
    """The one INFO line of a finished request (``fields``: model, api, status, timings ...)."""
    request_log.info("request %s %s %s", fields.get("api"), fields.get("model"), fields.get("outcome"),
                     extra={"fields": fields})
