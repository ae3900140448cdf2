"""The HTTP transports (httpx): building requests and reading responses are shared, pure functions.

An image is sent as the raw request body with its media type and the options as query
parameters; a task that takes a reference sends multipart/form-data (fields ``image`` and
``reference``). The task table (``tasks.py``) gives the path's verb and the result schema.
A task whose answer may be the image itself (``image_reply``: restoration) asks for the bytes
(smaller than base64 JSON) and gets a ``RestoredImage`` rebuilt from them and the
X-Image-Width/Height headers; every other task asks for JSON (``Accept: application/json``).

Deadlines: the server gets ``X-Request-Timeout`` = the client timeout (capped at its 600 s
maximum) and the client waits a little longer (``GRACE_S``), so that a late request normally
ends in the server's typed 504 (with its request id) rather than a dropped connection.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from hybridserve_client._base import Operation, Result
from hybridserve_client.exceptions import (
    ConnectionFailed,
    HybridServeError,
    ServerError,
    Timeout,
    error_from_http,
)
from hybridserve_client.results import RestorationResult, RestoredImage
from hybridserve_client.schemas import Health, ModelInfo, ModelList

METADATA_TYPES = {"models": ModelList, "model": ModelInfo, "live": Health, "ready": Health}
MAX_SERVER_TIMEOUT_S = 600.0
GRACE_S = 0.5


@dataclass(frozen=True)
class HTTPRequest:
    method: str
    path: str
    headers: dict[str, str]
    params: dict[str, Any] = field(default_factory=dict)
    content: bytes | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None


def inference_path(model: str, verb: str) -> str:
    return f"/v1/models/{quote(model, safe='')}/{verb}"


def build_http_request(operation: Operation) -> HTTPRequest:
    """The HTTP request that carries ``operation``."""
    headers = dict(operation.headers)
    if operation.kind != "infer":
        path = {"models": "/v1/models", "live": "/healthz", "ready": "/readyz"}.get(operation.kind)
        if operation.kind == "model":
            path = f"/v1/models/{quote(operation.model or '', safe='')}"
        return HTTPRequest("GET", path or "/", headers)
    task = operation.task
    assert operation.image is not None and operation.model and task is not None
    if operation.timeout:
        headers["X-Request-Timeout"] = f"{min(operation.timeout, MAX_SERVER_TIMEOUT_S):g}"
    if not task.image_reply:
        headers["Accept"] = "application/json"
    path = inference_path(operation.model, task.verb)
    if operation.reference is None:
        headers["Content-Type"] = operation.image.content_type
        return HTTPRequest("POST", path, headers, dict(operation.options), content=operation.image.data)
    files = {name: (name, picture.data, picture.content_type)
             for name, picture in (("image", operation.image), ("reference", operation.reference))}
    return HTTPRequest("POST", path, headers, dict(operation.options), files=files)


def parse_http_response(operation: Operation, status: int, headers: Mapping[str, str], body: bytes) -> Result:
    """The typed result of a response, or the typed exception it stands for."""
    request_id = headers.get("x-request-id") or operation.request_id
    if operation.kind == "ready" and status == 503:
        try:
            return Health.model_validate_json(body)
        except ValidationError:
            pass
    if status >= 400:
        raise error_from_http(status, body, headers, request_id)
    content_type = headers.get("content-type", "")
    task = operation.task
    try:
        if task is None:
            return METADATA_TYPES[operation.kind].model_validate_json(body)
        if task.image_reply and content_type.startswith("image/"):
            return _restoration(operation.model or "", content_type, headers, body)
        result = task.result.model_validate_json(body)
        return RestoredImage.from_schema(result) if isinstance(result, RestorationResult) else result
    except (ValidationError, ValueError) as exc:
        raise ServerError(f"unexpected response ({status}, {content_type or 'no content type'}): {exc}",
                          status=status, request_id=request_id) from None


def _restoration(model: str, content_type: str, headers: Mapping[str, str], body: bytes) -> RestoredImage:
    width, height = headers.get("x-image-width"), headers.get("x-image-height")
    if not (width and height):
        from PIL import Image

        width, height = Image.open(io.BytesIO(body)).size
    return RestoredImage(model, int(width), int(height), content_type.split("/", 1)[1].split(";")[0].strip(), body)


def httpx_timeout(timeout: float | None) -> httpx.Timeout:
    """Every phase (connect, write, read, pool) gets the server's deadline plus the grace."""
    return httpx.Timeout(None if timeout is None else timeout + GRACE_S)


def transport_error(exc: httpx.TransportError, operation: Operation) -> HybridServeError:
    """A network failure as a client exception: no answer in time is a Timeout, the rest ConnectionFailed."""
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return Timeout(f"no response within {operation.timeout:g} s ({type(exc).__name__})",
                       request_id=operation.request_id)
    return ConnectionFailed(f"{type(exc).__name__}: {exc or 'connection failed'}", request_id=operation.request_id)


def _limits(max_in_flight: int) -> httpx.Limits:
    return httpx.Limits(max_connections=max(100, max_in_flight), max_keepalive_connections=max(20, max_in_flight))


def _send_kwargs(request: HTTPRequest, operation: Operation) -> dict[str, Any]:
    return {"params": request.params, "headers": request.headers, "content": request.content,
            "files": request.files, "timeout": httpx_timeout(operation.timeout)}


class HTTPTransport:
    """Synchronous HTTP transport over one pooled ``httpx.Client`` (thread-safe)."""

    def __init__(self, url: str, *, verify: bool | str = True, max_in_flight: int = 8,
                 client: httpx.Client | None = None):
        self._client = client or httpx.Client(base_url=url, verify=verify, limits=_limits(max_in_flight))

    def handle(self, operation: Operation) -> Result:
        request = build_http_request(operation)
        try:
            response = self._client.request(request.method, request.path, **_send_kwargs(request, operation))
        except httpx.TransportError as exc:
            raise transport_error(exc, operation) from exc
        return parse_http_response(operation, response.status_code, response.headers, response.content)

    def close(self) -> None:
        self._client.close()


class AsyncHTTPTransport:
    """Asynchronous HTTP transport over one pooled ``httpx.AsyncClient``."""

    def __init__(self, url: str, *, verify: bool | str = True, max_in_flight: int = 8,
                 client: httpx.AsyncClient | None = None):
        self._client = client or httpx.AsyncClient(base_url=url, verify=verify, limits=_limits(max_in_flight))

    async def handle(self, operation: Operation) -> Result:
        request = build_http_request(operation)
        try:
            response = await self._client.request(request.method, request.path, **_send_kwargs(request, operation))
        except httpx.TransportError as exc:
            raise transport_error(exc, operation) from exc
        return parse_http_response(operation, response.status_code, response.headers, response.content)

    async def aclose(self) -> None:
        await self._client.aclose()
