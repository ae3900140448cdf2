"""The Open Inference Protocol (KServe v2) over HTTP: routes under ``/v2``, a thin adapter to ``oip``.

Routes: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]``,
``.../ready`` and ``POST .../infer``. Tensors travel as JSON ``data`` or, with the binary tensor
data extension, as raw bytes after a JSON header whose length is the ``Inference-Header-Content-Length``
header (inputs: parameter ``binary_data_size``; outputs: parameter ``binary_data`` per output or
``binary_data_output`` for the whole request). Errors leave as ``{"error": message}`` with the HTTP
status of the error table.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from hybridserve.server.observability import metrics
from hybridserve.server.transports import oip
from hybridserve.server.engine.dataplane import DataPlane
from hybridserve.server.core.errors import InvalidInput, as_hybridserve_error
from hybridserve.server.core.settings import Settings
from hybridserve.server.transports.http_base import read_body, request_id_of

INFERENCE_HEADER = "Inference-Header-Content-Length"


class OIPError(BaseModel):
    """The Open Inference Protocol's error body."""

    error: str


OIP_ERRORS: dict = {code: {"model": OIPError} for code in (400, 401, 404, 413, 415, 422, 503, 504)}


class _InputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] = {}
    data: Any = None


class _RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] = {}


class _InferRequestHeader(BaseModel):
    id: str = ""
    parameters: dict[str, Any] = {}
    inputs: list[_InputTensor]
    outputs: list[_RequestedOutput] | None = None


INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {
        "type": "object", "required": ["inputs"],
        "properties": {
            "id": {"type": "string"}, "parameters": {"type": "object"},
            "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "datatype", "shape"],
                       "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                                      "shape": {"type": "array", "items": {"type": "integer"}},
                                      "parameters": {"type": "object"}, "data": {}}}},
            "outputs": {"type": "array", "items": {"type": "object", "required": ["name"],
                        "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}}}},
        }}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": "JSON header then binary tensors (Inference-Header-Content-Length)"},
}}}


def _error(exc: BaseException) -> JSONResponse:
    error = as_hybridserve_error(exc)
    headers = {"Retry-After": str(max(1, round(error.retry_after)))} if error.retry_after is not None else None
    return JSONResponse({"error": error.message}, status_code=error.kind.http_status, headers=headers)


def _answers_errors(endpoint):
    """Every failure of ``endpoint`` leaves as an OIP error body, through the error table."""

    @functools.wraps(endpoint)
    async def guarded(*args, **kwargs):
        try:
            return await endpoint(*args, **kwargs)
        except Exception as exc:
            return _error(exc)

    return guarded


def _metadata_json(metadata: oip.ModelMetadata) -> dict[str, Any]:
    def tensors(specs):
        return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]

    return {"name": metadata.name, "versions": list(metadata.versions), "platform": metadata.platform,
            "inputs": tensors(metadata.inputs), "outputs": tensors(metadata.outputs)}


def _split_body(request: Request, body: bytes) -> tuple[bytes, bytes]:
    declared = request.headers.get(INFERENCE_HEADER)
    if declared is None:
        return body, b""
    if not declared.isdigit() or int(declared) > len(body):
        raise InvalidInput(f"{INFERENCE_HEADER}: {declared!r} is not a length within the {len(body)}-byte body")
    return body[:int(declared)], body[int(declared):]


def parse_infer_request(name: str, version: str, header: bytes, binary: bytes) -> tuple[oip.InferCall, set[str] | None]:
    """The call, and which outputs go back as binary (``None``: every output)."""
    try:
        payload = _InferRequestHeader.model_validate_json(header)
    except ValidationError as exc:
        raise InvalidInput("request JSON: " + "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:5])) from None
    inputs, offset = [], 0
    for tensor in payload.inputs:
        size = tensor.parameters.get("binary_data_size")
        if size is not None:
            left = len(binary) - offset
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= left:
                raise InvalidInput(f"input {tensor.name!r}: binary_data_size {size!r} is not within the {left} "
                                   "bytes of binary data left")
            inputs.append(oip.tensor_from_raw(tensor.name, tensor.datatype, tensor.shape, binary[offset:offset + size]))
            offset += size
        elif tensor.data is not None:
            inputs.append(oip.tensor_from_values(tensor.name, tensor.datatype, tensor.shape, tensor.data))
        else:
            raise InvalidInput(f"input {tensor.name!r}: needs `data`, or the parameter `binary_data_size`")
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data follow the inputs that no input's "
                           "binary_data_size accounts for")
    all_binary = payload.parameters.get("binary_data_output") is True
    outputs = None if payload.outputs is None else [o.name for o in payload.outputs]
    if payload.outputs is None:
        binary_outputs = None if all_binary else set()
    else:
        binary_outputs = {o.name for o in payload.outputs if o.parameters.get("binary_data", all_binary) is True}
    call = oip.InferCall(name, version, payload.id, inputs, outputs, dict(payload.parameters))
    return call, binary_outputs


def infer_response(answer: oip.InferAnswer, binary_outputs: set[str] | None) -> Response:
    outputs, chunks = [], []
    for tensor in answer.outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary_outputs is None or tensor.name in binary_outputs:
            raw = oip.tensor_to_raw(tensor)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = oip.tensor_to_json(tensor)
        outputs.append(entry)
    head: dict[str, Any] = {"model_name": answer.model, "model_version": answer.version, "outputs": outputs}
    if answer.id:
        head["id"] = answer.id
    encoded = json.dumps(head, separators=(",", ":")).encode()
    if not chunks:
        return Response(encoded, media_type="application/json")
    return Response(encoded + b"".join(chunks), media_type="application/octet-stream",
                    headers={INFERENCE_HEADER: str(len(encoded))})


def oip_router(plane: DataPlane, settings: Settings) -> APIRouter:
    """The ``/v2`` routes over ``plane``."""
    router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"], responses=OIP_ERRORS)

    @router.get("", summary="Server metadata")
    @_answers_errors
    async def server_metadata() -> Response:
        return JSONResponse({"name": oip.SERVER_NAME, "version": oip.SERVER_VERSION,
                             "extensions": list(oip.EXTENSIONS)})

    @router.get("/health/live", summary="Server liveness")
    async def server_live() -> Response:
        return JSONResponse({"live": True})

    @router.get("/health/ready", summary="Server readiness: 200 once every model is ready, else 400")
    @_answers_errors
    async def server_ready() -> Response:
        ready = (await plane.health()).status == "ok"
        return JSONResponse({"ready": ready}, status_code=200 if ready else 400)

    @_answers_errors
    async def model_metadata(name: str, version: str = "") -> Response:
        spec = plane.endpoint(name).spec
        oip.check_version(spec, version)
        return JSONResponse(_metadata_json(oip.model_metadata(spec)))

    @_answers_errors
    async def model_ready(name: str, version: str = "") -> Response:
        oip.check_version(plane.endpoint(name).spec, version)
        ready = (await plane.model_info(name)).status == "ready"
        return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 400)

    @_answers_errors
    async def model_infer(request: Request, name: str, version: str = "") -> Response:
        seen = metrics.observe_request("oip", name, plane.endpoints, request_id_of(request),
                                       request.headers.get("content-length"))
        try:
            header, binary = _split_body(request, await read_body(request, settings.max_body_bytes))
            call, binary_outputs = parse_infer_request(name, version, header, binary)
            answer = await oip.infer(plane, call, settings.request_timeout_s)
        except ClientDisconnect:  # gone while sending its body: nobody to answer
            seen.cancelled()
            return Response(status_code=metrics.CLIENT_CLOSED_REQUEST)
        except Exception as exc:
            seen.failed(exc)
            raise
        return seen.answered(infer_response(answer, binary_outputs))

    for base in ("/models/{name}", "/models/{name}/versions/{version}"):
        router.add_api_route(base, model_metadata, methods=["GET"], summary="Model metadata")
        router.add_api_route(f"{base}/ready", model_ready, methods=["GET"], summary="Model readiness")
        router.add_api_route(f"{base}/infer", model_infer, methods=["POST"], summary="Inference",
                             openapi_extra=INFER_BODY)
    return router
