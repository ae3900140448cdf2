"""The typed HTTP API (FastAPI): a thin adapter from HTTP to the data plane.

Routes: ``POST /v1/models/{name}/{classify|detect|restore|assess}`` (raw image body, multipart
field ``image`` [+ ``reference``], or JSON with base64), ``GET /v1/models[/{name}]``,
``GET /healthz`` and ``GET /readyz``. Every error leaves as ``{"error": {"code", "message"}}``
with the status from the error table. A request whose client disconnects before its answer is
cancelled (``CancelOnDisconnect``), which drops its items from the batch queue.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from hybridserve_client.schemas import ErrorResponse, Health, ImageRequest, ModelInfo, ModelList
from hybridserve.server.observability import metrics
from hybridserve.server.engine.dataplane import DataPlane
from hybridserve.server.core.errors import (
    ERROR_TABLE,
    HybridServeError,
    InvalidInput,
    PayloadTooLarge,
    UnsupportedMediaType,
    as_hybridserve_error,
)
from hybridserve.server.tasks import TASKS, InferenceRequest, Options, Task
from hybridserve.server.observability.logs import RequestIdMiddleware, new_request_id, request_id_from
from hybridserve.server.transports.auth import AuthMiddleware, AuthPolicy

log = logging.getLogger("hybridserve.http")

ERROR_RESPONSES: dict = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422, 503, 504)}
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff", "image/gif", "application/octet-stream")


@dataclass(frozen=True)
class HTTPSettings:
    max_body_bytes: int = 32 * 1024 * 1024
    default_timeout_s: float = 60.0
    max_timeout_s: float = 600.0
    echo_request_id: bool = True  # Ray Serve's proxy already returns X-Request-ID itself
    cors_origins: tuple[str, ...] = ()

    @classmethod
    def from_env(cls) -> HTTPSettings:
        return cls(
            max_body_bytes=int(os.environ.get("HYBRIDSERVE_MAX_BODY_BYTES", cls.max_body_bytes)),
            default_timeout_s=float(os.environ.get("HYBRIDSERVE_REQUEST_TIMEOUT_S", cls.default_timeout_s)),
            cors_origins=tuple(o.strip() for o in os.environ.get("HYBRIDSERVE_CORS_ORIGINS", "").split(",") if o.strip()),
        )


class CancelOnDisconnect:
    """ASGI middleware: cancel a request's task when its client disconnects before the answer starts.

    uvicorn never cancels an app on its own. Once the app has read the whole body, a watcher waits
    on ``receive()``, which the server then answers only with ``http.disconnect`` (client gone, or
    the response complete). A cancelled request leaves no answer, a 499 in the request log and
    metrics, and no error; its queued items are dropped before compute (``ModelRuntime.infer``).
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
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


def _options(source: dict[str, Any]) -> Options:
    return Options(
        top_k=source.get("top_k"),
        score_threshold=source.get("score_threshold"),
        max_detections=source.get("max_detections"),
        format=source.get("format"),
    )


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


def _b64(value: str, field: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{field}: not valid base64") from None


async def parse_inference(request: Request, query: Options, settings: HTTPSettings) -> InferenceRequest:
    """Read an image request in any of the three accepted forms."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _parse_multipart(request, query, settings)
    body = await read_body(request, settings.max_body_bytes)
    if content_type == "application/json":
        try:
            payload = ImageRequest.model_validate_json(body)
        except ValidationError as exc:
            raise InvalidInput("JSON body: " + "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:5])) from None
        reference = _b64(payload.reference, "reference") if payload.reference else None
        merged = {**_nonnull(query.__dict__), **payload.model_dump(exclude_none=True, exclude={"image", "reference"})}
        return InferenceRequest(_b64(payload.image, "image"), reference, _options(merged))
    if content_type and not (content_type.startswith("image/") or content_type in IMAGE_TYPES):
        raise UnsupportedMediaType(
            f"content type {content_type!r} is not accepted: send an image body, multipart/form-data or application/json"
        )
    return InferenceRequest(body, None, query)


async def _parse_multipart(request: Request, query: Options, settings: HTTPSettings) -> InferenceRequest:
    body = await read_body(request, settings.max_body_bytes)  # the limit holds for chunked bodies too

    async def replay_body() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay_body).form(max_files=2, max_fields=8,
                                                              max_part_size=settings.max_body_bytes)
    except Exception as exc:  # malformed multipart
        raise InvalidInput(f"multipart body could not be parsed: {getattr(exc, 'detail', exc)}") from None
    files = {}
    for field in ("image", "reference"):
        part = form.get(field)
        if part is None:
            continue
        files[field] = await part.read() if hasattr(part, "read") else str(part).encode()
    if "image" not in files:
        raise InvalidInput("multipart body needs a file field named 'image'")
    fields: dict[str, Any] = _nonnull(query.__dict__)
    for name, cast in (("top_k", int), ("score_threshold", float), ("max_detections", int), ("format", str)):
        if name in form and not hasattr(form[name], "read"):
            try:
                fields[name] = cast(form[name])
            except ValueError:
                raise InvalidInput(f"form field {name!r}: expected {cast.__name__}") from None
    try:
        options = ImageRequest(image="", **fields)
    except ValidationError as exc:
        raise InvalidInput("; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors()[:5])) from None
    return InferenceRequest(files["image"], files.get("reference"), _options(options.model_dump(exclude_none=True)))


def _nonnull(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _accepts_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "image/" not in accept


def _result_response(task: Task, spec, parsed: InferenceRequest, output: Any, request: Request,
                     headers: dict[str, str]) -> Response:
    if not _accepts_json(request):
        binary = task.binary(spec, output, parsed.options)
        if binary is not None and (task.binary_by_default or binary.media_type in request.headers.get("accept", "")):
            headers.update(binary.headers)
            return Response(binary.data, media_type=binary.media_type, headers=headers)
    typed = task.typed(spec, output, parsed.options)
    return Response(typed.model_dump_json(), media_type="application/json", headers=headers)


def create_http_app(plane: DataPlane, *, settings: HTTPSettings | None = None) -> FastAPI:
    """The FastAPI app over ``plane``."""
    settings = settings or HTTPSettings.from_env()
    app = FastAPI(
        title="hybridserve",
        version="0.1.0",
        description="Inference server for hybrid CNN-Transformer vision models.",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.plane = plane
    app.add_middleware(CancelOnDisconnect)  # innermost: the request id is still bound when it logs the 499
    policy = AuthPolicy.from_env()
    if policy.enabled:
        app.add_middleware(AuthMiddleware, policy=policy)
    if settings.echo_request_id:  # in-process; under Ray Serve its proxy settles and returns the id
        app.add_middleware(RequestIdMiddleware)
    if settings.cors_origins:  # off unless configured; outermost, so preflights need no key
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["X-Request-ID", "X-Batch-Size"])
    from hybridserve.server.transports.oip_http import oip_router  # imports this module, so not at the top
    app.include_router(oip_router(plane, settings))

    @app.exception_handler(HybridServeError)
    async def _typed(request: Request, exc: HybridServeError):
        return error_response(exc, request.headers.get("x-request-id") if settings.echo_request_id else None)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        error = InvalidInput(detail)
        if request.method == "POST" and request.url.path.startswith("/v1/models/"):  # an inference request
            seen = metrics.observe_request("http", request.path_params.get("name", ""), plane.endpoints,
                                           request_id_of(request), request.headers.get("content-length"))
            seen.failed(error)
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error")
        return error_response(as_hybridserve_error(exc))

    async def infer(request: Request, name: str, verb: str, query: Options) -> Response:
        request_id = request_id_of(request)
        seen = metrics.observe_request("http", name, plane.endpoints, request_id, request.headers.get("content-length"))
        try:
            timeout = _timeout(request, settings)
            parsed = await parse_inference(request, query, settings)
            outcome = await plane.infer(name, verb, parsed, timeout)
        except ClientDisconnect:  # gone while sending its body: nobody to answer
            seen.cancelled()
            return Response(status_code=metrics.CLIENT_CLOSED_REQUEST)
        except Exception as exc:  # every failure leaves through the error table
            return error_response(seen.failed(exc), request_id if settings.echo_request_id else None)
        timing = ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in outcome.timings.items())
        headers = {"X-Batch-Size": str(outcome.batch_size), "Server-Timing": timing}
        if settings.echo_request_id:
            headers["X-Request-ID"] = request_id
        spec = plane.endpoint(name).spec
        response = _result_response(TASKS[spec.task], spec, parsed, outcome.result, request, headers)
        return seen.answered(response, [outcome])

    body_doc = {
        "requestBody": {
            "required": True,
            "content": {
                **{t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES[:5]},
                "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
                    "image": {"type": "string", "format": "binary"},
                    "reference": {"type": "string", "format": "binary"}}}},
                "application/json": {"schema": ImageRequest.model_json_schema()},
            },
        }
    }
    for task in TASKS.values():
        _add_infer_route(app, infer, task, body_doc)

    @app.get("/v1/models", response_model=ModelList, tags=["models"], summary="List the served models",
             responses=ERROR_RESPONSES)
    async def list_models() -> Response:
        return _json(await plane.list_models())

    @app.get("/v1/models/{name}", response_model=ModelInfo, tags=["models"], summary="Describe one model",
             responses=ERROR_RESPONSES)
    async def model_info(name: str) -> Response:
        return _json(await plane.model_info(name))

    @app.get("/healthz", response_model=Health, tags=["health"], summary="Liveness")
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, tags=["health"], summary="Ready once every model is warmed up",
             responses={503: {"model": Health}})
    async def readyz() -> Response:
        health = await plane.health()
        return Response(health.model_dump_json(), status_code=200 if health.status == "ok" else 503,
                        media_type="application/json")

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:  # in-process serving; under Ray, Ray's metrics export
        return metrics.metrics_response()

    return app


def query_options(
    top_k: int | None = Query(None, ge=1, le=1000, description="Classification: how many classes (default 5)."),
    score_threshold: float | None = Query(None, ge=0.0, le=1.0, description="Detection: minimum score (default 0.3)."),
    max_detections: int | None = Query(None, ge=1, le=1000, description="Detection: at most this many (default 100)."),
    format: str | None = Query(None, pattern="^(png|jpeg|webp)$", description="Restoration: output encoding."),
) -> Options:
    return Options(top_k, score_threshold, max_detections, format)


def _add_infer_route(app: FastAPI, infer, task: Task, doc: dict) -> None:
    verb = task.verb
    responses: dict = {**ERROR_RESPONSES, 200: {"model": task.result}}
    if task.binary_types:
        responses[200]["content"] = {media_type: {} for media_type in task.binary_types}

    async def endpoint(request: Request, name: str, options: Options = Depends(query_options)) -> Response:
        return await infer(request, name, verb, options)

    app.add_api_route(f"/v1/models/{{name}}/{verb}", endpoint, methods=["POST"], tags=["inference"],
                      summary=f"{verb.capitalize()} an image ({task.name} models)", responses=responses,
                      openapi_extra=doc, response_model=None)


def _json(model) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _timeout(request: Request, settings: HTTPSettings) -> float:
    raw = request.headers.get("x-request-timeout")
    if raw is None:
        return settings.default_timeout_s
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput("X-Request-Timeout must be a number of seconds") from None
    if not 0 < value <= settings.max_timeout_s:
        raise InvalidInput(f"X-Request-Timeout must be in (0, {settings.max_timeout_s:g}] seconds")
    return value
