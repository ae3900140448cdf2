"""The gRPC services over a data plane: typed ``hybridserve.v1`` and the Open Inference Protocol.

The same methods run in two hosts: Ray Serve's gRPC proxy registers the generated servicers
named in ``SERVICER_FUNCTIONS`` and calls the gateway's method of the same name as the RPC (these
classes are its mixins), and ``grpc_server`` serves them in-process with grpc.aio. Either way a
method gets the request message and a context (``invocation_metadata``, ``set_code``...) and
translates to the data plane (``self.plane``) and back. Nothing here imports Ray.

Errors set the status code of the error table, the message as details, and the stable error
code in the trailing metadata ``hybridserve-error-code`` (several codes share INVALID_ARGUMENT).
A request may carry the metadata ``x-request-timeout`` (seconds), like the HTTP header.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import grpc
from google.protobuf import json_format

from hybridserve_client._grpc.hybridserve.oip.v2 import open_inference_pb2 as oip_pb
from hybridserve_client._grpc.hybridserve.v1 import hybridserve_pb2 as v1
from hybridserve.server.observability import metrics
from hybridserve.server.transports import oip
from hybridserve.server.engine.dataplane import DataPlane
from hybridserve.server.core.errors import InvalidInput, as_hybridserve_error
from hybridserve.server.tasks import TASKS, InferenceRequest, Task
from hybridserve.server.core.settings import Settings
from hybridserve.server.transports.auth import AuthPolicy

log = logging.getLogger("hybridserve.grpc")

SERVICER_FUNCTIONS: list[str] = [
    "hybridserve_client._grpc.hybridserve.v1.hybridserve_pb2_grpc.add_HybridServeServicer_to_server",
    "hybridserve_client._grpc.inference.grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server",
]
ERROR_CODE_METADATA = "hybridserve-error-code"
TIMEOUT_METADATA = "x-request-timeout"

# OIP datatype -> the InferTensorContents field that holds its typed values (FP16 has none).
CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def report_error(context: Any, exc: BaseException) -> None:
    """Put ``exc`` on the call's status through the error table."""
    error = as_hybridserve_error(exc)
    if error.code == "internal":
        log.error("gRPC call failed", exc_info=exc)
    if context is None:
        raise error from exc
    context.set_code(grpc.StatusCode[error.kind.grpc_status])
    context.set_details(error.message)
    metadata = [(ERROR_CODE_METADATA, error.code)]
    if error.retry_after is not None:
        metadata.append(("retry-after", str(max(1, round(error.retry_after)))))
    context.set_trailing_metadata(metadata)


OPEN_RPCS = {"ServerLive", "ServerReady"}  # health stays open, as /healthz and /readyz do


def _rpc(response_type: type, api: str | None = None):
    """An RPC method whose failures become a status (and an empty ``response_type`` message).

    ``api`` ("grpc", "oip") marks an inference RPC: counted in the metrics and logged per request."""

    def decorate(method):
        @functools.wraps(method)
        async def call(self, request, grpc_context: Any = None):
            seen = metrics.observe_rpc(api, self.plane.endpoints, request, grpc_context)
            try:
                if self.auth.enabled and method.__name__ not in OPEN_RPCS:
                    self.auth.check(grpc_context.invocation_metadata() if grpc_context is not None else [])
                return seen.answered(await method(self, request, grpc_context))
            except asyncio.CancelledError:  # the client cancelled, or its deadline passed: nobody to answer
                seen.cancelled()
                raise
            except Exception as exc:
                report_error(grpc_context, exc)
                seen.failed(exc)
                return response_type()

        return call

    return decorate


def request_timeout(context: Any, settings: Settings) -> float:
    """Seconds from the ``x-request-timeout`` metadata, else the server's default."""
    raw = dict(context.invocation_metadata()).get(TIMEOUT_METADATA) if context is not None else None
    if raw is None:
        return settings.request_timeout_s
    try:
        seconds = float(raw)
    except ValueError:
        raise InvalidInput(f"metadata {TIMEOUT_METADATA} must be a number of seconds, got {raw!r}") from None
    if not 0 < seconds <= settings.max_timeout_s:
        raise InvalidInput(f"metadata {TIMEOUT_METADATA} must be in (0, {settings.max_timeout_s:g}] seconds")
    return seconds


# ------------------------------------------------------------------ Open Inference Protocol


def _parameter(value: oip_pb.InferParameter) -> Any:
    choice = value.WhichOneof("parameter_choice")
    return getattr(value, choice) if choice else None


def call_from_proto(request: oip_pb.ModelInferRequest) -> oip.InferCall:
    """An ``InferCall`` from a ModelInferRequest with ``raw_input_contents`` or typed ``contents``."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    inputs = []
    for position, tensor in enumerate(request.inputs):
        shape = list(tensor.shape)
        if raw:
            inputs.append(oip.tensor_from_raw(tensor.name, tensor.datatype, shape, raw[position]))
            continue
        field = CONTENTS_FIELDS.get(tensor.datatype)
        if field is None:
            raise InvalidInput(f"input {tensor.name!r}: datatype {tensor.datatype!r} has no typed contents; "
                               "send it in raw_input_contents")
        values = list(getattr(tensor.contents, field))
        inputs.append(oip.tensor_from_values(tensor.name, tensor.datatype, shape, values))
    return oip.InferCall(
        model=request.model_name,
        version=request.model_version,
        id=request.id,
        inputs=inputs,
        outputs=[output.name for output in request.outputs] or None,
        parameters={key: _parameter(value) for key, value in request.parameters.items()},
    )


def answer_to_proto(answer: oip.InferAnswer) -> oip_pb.ModelInferResponse:
    response = oip_pb.ModelInferResponse(model_name=answer.model, model_version=answer.version, id=answer.id)
    for tensor in answer.outputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(oip.tensor_to_raw(tensor))
    return response


def _tensor_metadata(specs: tuple[oip.TensorSpec, ...]) -> list[oip_pb.ModelMetadataResponse.TensorMetadata]:
    return [oip_pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape) for s in specs]


class ServicerBase:
    """What the services need from their host: a data plane, the settings and the auth policy."""

    plane: DataPlane
    settings: Settings
    auth: AuthPolicy

    def init_services(self, plane: DataPlane, settings: Settings) -> None:
        self.plane, self.settings, self.auth = plane, settings, AuthPolicy.from_settings(settings)


class OIPServicerMixin(ServicerBase):
    """``inference.GRPCInferenceService`` (Open Inference Protocol v2) over ``self.plane``."""

    @_rpc(oip_pb.ServerLiveResponse)
    async def ServerLive(self, request, grpc_context=None):
        return oip_pb.ServerLiveResponse(live=True)

    @_rpc(oip_pb.ServerReadyResponse)
    async def ServerReady(self, request, grpc_context=None):
        return oip_pb.ServerReadyResponse(ready=(await self.plane.health()).status == "ok")

    @_rpc(oip_pb.ModelReadyResponse)
    async def ModelReady(self, request, grpc_context=None):
        oip.check_version(self.plane.endpoint(request.name).spec, request.version)
        return oip_pb.ModelReadyResponse(ready=(await self.plane.model_info(request.name)).status == "ready")

    @_rpc(oip_pb.ServerMetadataResponse)
    async def ServerMetadata(self, request, grpc_context=None):
        return oip_pb.ServerMetadataResponse(name=oip.SERVER_NAME, version=oip.SERVER_VERSION,
                                             extensions=list(oip.EXTENSIONS))

    @_rpc(oip_pb.ModelMetadataResponse)
    async def ModelMetadata(self, request, grpc_context=None):
        spec = self.plane.endpoint(request.name).spec
        oip.check_version(spec, request.version)
        metadata = oip.model_metadata(spec)
        return oip_pb.ModelMetadataResponse(
            name=metadata.name, versions=list(metadata.versions), platform=metadata.platform,
            inputs=_tensor_metadata(metadata.inputs), outputs=_tensor_metadata(metadata.outputs),
        )

    @_rpc(oip_pb.ModelInferResponse, api="oip")
    async def ModelInfer(self, request, grpc_context=None):
        call = call_from_proto(request)
        answer = await oip.infer(self.plane, call, request_timeout(grpc_context, self.settings))
        return answer_to_proto(answer)


# ------------------------------------------------------------------ typed hybridserve.v1


def _message(result: Any, message_type: type):
    """A pydantic result as its proto mirror (field names are the same by design)."""
    return json_format.ParseDict(result.model_dump(mode="json"), message_type())


def _task_rpc(task: Task):
    """The typed RPC of ``task`` (``Classify``, ``Detect``...): request message -> task -> proto result."""

    # Known once, not per call: whether the task's request message has a reference image.
    takes_reference = "reference" in getattr(v1, f"{task.grpc_method}Request").DESCRIPTOR.fields_by_name

    async def call(self, request, grpc_context=None):
        options = oip.options_from(task.grpc_options(request))
        reference = request.reference if takes_reference and request.HasField("reference") else None
        inference = InferenceRequest(request.image, reference, options)
        outcome = await self.plane.infer(request.model, task.verb, inference, request_timeout(grpc_context, self.settings))
        metrics.note_outcomes([outcome])
        spec = self.plane.endpoint(request.model).spec
        return task.grpc_message(spec, outcome.result, options, v1)

    call.__name__ = call.__qualname__ = task.grpc_method
    return _rpc(getattr(v1, task.result.__name__), api="grpc")(call)


class TaskServicerMixin(ServicerBase):
    """``hybridserve.v1.HybridServe`` over ``self.plane``: one RPC per task of the registry."""

    @_rpc(v1.ModelList)
    async def ListModels(self, request, grpc_context=None):
        return _message(await self.plane.list_models(), v1.ModelList)

    @_rpc(v1.ModelInfo)
    async def GetModel(self, request, grpc_context=None):
        return _message(await self.plane.model_info(request.name), v1.ModelInfo)


for _task in TASKS.values():
    setattr(TaskServicerMixin, _task.grpc_method, _task_rpc(_task))
