"""The typed HTTP API (FastAPI): a thin adapter from HTTP to the data plane.

Routes: ``POST /v1/models/{name}/{verb}``, one per task of the registry (raw image body, multipart
field ``image`` [+ ``reference``], or JSON with base64), ``GET /v1/models[/{name}]``,
``GET /healthz`` and ``GET /readyz``. Every error leaves as ``{"error": {"code", "message"}}``
with the status from the error table. A request whose client disconnects before its answer is
cancelled (``transports.middleware``), which drops its items from the batch queue.
"""

from __future__ import annotations

import base64
import binascii
import logging
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
from hybridserve.server.core.errors import HybridServeError, InvalidInput, UnsupportedMediaType, as_hybridserve_error
from hybridserve.server.core.settings import Settings
from hybridserve.server.tasks import TASKS, InferenceRequest, Options, Task
from hybridserve.server.transports.auth import AuthPolicy
from hybridserve.server.transports.http_base import (
    error_response, read_body, request_id_of, request_timeout,
)
from hybridserve.server.transports.middleware import RequestMiddleware, route_path
from hybridserve.server.transports.oip_http import oip_router

log = logging.getLogger("hybridserve.http")

ERROR_RESPONSES: dict = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422, 503, 504)}
# Every value of the ``format`` option over the tasks; each task checks its own (``Task.check_options``).
FORMATS = tuple(dict.fromkeys(fmt for task in TASKS.values() for fmt in task.formats))
FORMATS_DOC = "Output encoding, by task (default first): " + "; ".join(
    f"{task.name}: {', '.join(task.formats)}" for task in TASKS.values() if task.formats) + "."
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff", "image/gif", "application/octet-stream")


def _options(source: dict[str, Any]) -> Options:
    return Options(
        top_k=source.get("top_k"),
        score_threshold=source.get("score_threshold"),
        max_detections=source.get("max_detections"),
        format=source.get("format"),
    )


def _b64(value: str, field: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{field}: not valid base64") from None


async def parse_inference(request: Request, query: Options, settings: Settings) -> InferenceRequest:
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


async def _parse_multipart(request: Request, query: Options, settings: Settings) -> InferenceRequest:
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


def create_http_app(plane: DataPlane, settings: Settings, *, echo_request_id: bool = True) -> FastAPI:
    """The FastAPI app over ``plane``. ``echo_request_id``: answer with X-Request-ID (under Ray
    Serve its proxy settles and returns the id itself)."""
    app = FastAPI(
        title="hybridserve",
        version="0.1.0",
        description="Inference server for hybrid CNN-Transformer vision models.",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.plane = plane

    @app.exception_handler(HybridServeError)
    async def _typed(request: Request, exc: HybridServeError):
        return _error_answer(request, exc, echo_request_id)

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
        return _error_answer(request, exc, echo_request_id)

    async def infer(request: Request, name: str, verb: str, query: Options) -> Response:
        request_id = request_id_of(request)
        seen = metrics.observe_request("http", name, plane.endpoints, request_id, request.headers.get("content-length"))
        try:
            timeout = request_timeout(request, settings)
            parsed = await parse_inference(request, query, settings)
            outcome = await plane.infer(name, verb, parsed, timeout)
        except ClientDisconnect:  # gone while sending its body: nobody to answer
            seen.cancelled()
            return Response(status_code=metrics.CLIENT_CLOSED_REQUEST)
        except Exception as exc:  # every failure leaves through the error table
            return error_response(seen.failed(exc), request_id if echo_request_id else None)
        timing = ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in outcome.timings.items())
        headers = {"X-Batch-Size": str(outcome.batch_size), "Server-Timing": timing}
        if echo_request_id:
            headers["X-Request-ID"] = request_id
        spec = plane.endpoint(name).spec
        response = _result_response(TASKS[spec.task], spec, parsed, outcome.result, request, headers)
        return seen.answered(response, [outcome])

    # Request id (in-process; under Ray Serve its proxy settles and returns it), auth, the
    # disconnect watch and the direct inference route, in one layer.
    app.add_middleware(RequestMiddleware, policy=AuthPolicy.from_settings(settings), echo_request_id=echo_request_id,
                       direct=_direct_inference(infer, echo_request_id))
    if settings.cors_origins:  # off unless configured; outermost, so preflights need no key
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["X-Request-ID", "X-Batch-Size"])
    app.include_router(oip_router(plane, settings))

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


def _error_answer(request: Request, exc: Exception, echo_request_id: bool) -> Response:
    """What the app's exception handlers answer: ours as they are (with the request id where the
    app echoes it), anything else logged and answered as an internal error without its details."""
    if isinstance(exc, HybridServeError):
        return error_response(exc, request.headers.get("x-request-id") if echo_request_id else None)
    log.exception("unexpected error", exc_info=exc)
    return error_response(as_hybridserve_error(exc))


def _direct_inference(infer, echo_request_id: bool):
    """The hot path past FastAPI's routing and dependency solving: ``POST /v1/models/{name}/{verb}``
    without a query string runs the routes' own ``infer`` with default options (a query string
    goes through the routes, which validate it). Errors answer as the app's exception handlers do."""
    verbs = frozenset(task.verb for task in TASKS.values())
    defaults = Options()

    async def answer(scope: dict, receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        try:
            response = await infer(request, scope["path_params"]["name"], scope["path_params"]["verb"], defaults)
        except Exception as exc:
            response = _error_answer(request, exc, echo_request_id)
        await response(scope, receive, send)

    def direct(scope: dict):
        if scope["method"] != "POST" or scope.get("query_string"):
            return None
        path = route_path(scope)
        if not path.startswith("/v1/models/"):
            return None
        parts = path[len("/v1/models/"):].split("/")
        if len(parts) != 2 or not parts[0] or parts[1] not in verbs:
            return None
        scope["path_params"] = {"name": parts[0], "verb": parts[1]}
        return answer

    return direct


async def query_options(  # async: FastAPI would run a plain function on its thread pool, per request
    top_k: int | None = Query(None, ge=1, le=1000, description="Classification: how many classes (default 5)."),
    score_threshold: float | None = Query(None, ge=0.0, le=1.0, description="Detection: minimum score (default 0.3)."),
    max_detections: int | None = Query(None, ge=1, le=1000, description="Detection: at most this many (default 100)."),
    format: str | None = Query(None, pattern=f"^({'|'.join(FORMATS)})$", description=FORMATS_DOC),
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
