"""The gRPC transports over the typed ``hybridserve.v1.HybridServe`` service (sync and grpc.aio).

Requests and replies are converted by shared pure functions: ``grpc_request`` picks the RPC
and its request message from the task table (``tasks.py``) and builds the message and
metadata, ``from_grpc`` turns a reply into the same result types the HTTP transport returns
(the reply messages mirror the JSON results field by field, so ``json_format`` maps one onto
the other; a restored image is taken as the raw bytes it arrives in). The service has no
health RPC, so ``live``/``ready`` ask ``ListModels``: live when it answers, ready when every
model reports ``ready``.

URLs: ``grpc://host:port`` (plaintext) or ``grpcs://host:port`` (TLS with the system roots).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc
import grpc.aio
from google.protobuf import json_format
from pydantic import ValidationError

from hybridserve_client._base import Operation, Result
from hybridserve_client._grpc.hybridserve.v1 import hybridserve_pb2 as pb
from hybridserve_client._grpc.hybridserve.v1 import hybridserve_pb2_grpc as pb_grpc
from hybridserve_client.exceptions import HybridServeError, ServerError, error_from_grpc
from hybridserve_client.results import RestoredImage
from hybridserve_client.schemas import BatchingInfo, Health, InputContract, ModelInfo, ModelList

GRACE_S = 0.5  # the client waits this much longer than the deadline it gives the server
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


@dataclass(frozen=True)
class GRPCCall:
    method: str  # the stub attribute, e.g. "Classify"
    message: Any
    metadata: tuple[tuple[str, str], ...]
    timeout: float | None


def target_of(url: str) -> tuple[str, bool]:
    """(host:port, secure) of a grpc:// or grpcs:// URL; a bare host:port is plaintext."""
    parts = urlsplit(url if "://" in url else f"grpc://{url}")
    if not parts.hostname or not parts.port:
        raise ValueError(f"gRPC URL {url!r} needs a host and a port, e.g. grpc://localhost:9000")
    return parts.netloc, parts.scheme == "grpcs"


def grpc_request(operation: Operation) -> GRPCCall:
    """The RPC, message, metadata and deadline that carry ``operation``."""
    metadata = [(key.lower(), value) for key, value in operation.headers.items()]
    timeout = None if operation.timeout is None else operation.timeout + GRACE_S
    if operation.kind == "model":
        return GRPCCall("GetModel", pb.GetModelRequest(name=operation.model or ""), tuple(metadata), timeout)
    if operation.kind != "infer":
        return GRPCCall("ListModels", pb.ListModelsRequest(), tuple(metadata), timeout)
    task = operation.task
    assert operation.image is not None and operation.model and task is not None
    if operation.timeout is not None:
        metadata.append(("x-request-timeout", f"{min(operation.timeout, 600.0):g}"))
    fields: dict[str, Any] = {"model": operation.model, "image": operation.image.data, **operation.options}
    if operation.reference is not None:
        fields["reference"] = operation.reference.data
    message = getattr(pb, task.grpc_request)
    return GRPCCall(task.grpc_method, message(**fields), tuple(metadata), timeout)


def _optional(message: Any, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


def model_info(message: Any) -> ModelInfo:
    contract, batching = message.input, message.batching
    size = tuple(contract.input_size) or None
    return ModelInfo(
        name=message.name, task=message.task, verb=message.verb, architecture=message.architecture,
        status=message.status, reason=_optional(message, "reason"),
        input=InputContract(input_size=size, resize=contract.resize, color=contract.color,
                            scale=_optional(contract, "scale"), tile=_optional(contract, "tile"),
                            tile_overlap=_optional(contract, "tile_overlap"),
                            needs_reference=contract.needs_reference),
        batching=BatchingInfo(max_batch_size=batching.max_batch_size, max_wait_ms=batching.max_wait_ms,
                              latency_slo_ms=_optional(batching, "latency_slo_ms"),
                              tuned_batch_size=_optional(batching, "tuned_batch_size")),
        labels=message.labels, backend=_optional(message, "backend"), device=message.device,
        load_seconds=_optional(message, "load_seconds"), description=_optional(message, "description"))


def from_grpc(operation: Operation, reply: Any) -> Result:
    """The typed result of a reply to ``operation``."""
    if operation.kind in ("models", "live", "ready"):
        listing = ModelList(models=[model_info(m) for m in reply.models])
        if operation.kind == "models":
            return listing
        statuses = {m.name: m.status for m in listing.models}
        ready = operation.kind == "live" or all(status == "ready" for status in statuses.values())
        return Health(status="ok" if ready else "unavailable", models=statuses)
    if operation.kind == "model":
        return model_info(reply)
    task = operation.task
    assert task is not None
    if task.image_reply:
        return RestoredImage(reply.model, reply.width, reply.height, reply.format, reply.image)
    fields = json_format.MessageToDict(reply, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True, unquote_int64_if_possible=True)
    try:
        return task.result.model_validate(fields)
    except ValidationError as exc:
        raise ServerError(f"unexpected {task.grpc_method} reply: {exc}", request_id=operation.request_id) from None


def rpc_error(exc: grpc.RpcError, operation: Operation) -> HybridServeError:
    """A failed RPC as a client exception (status code and the ``hybridserve-error-code`` trailer)."""
    code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
    trailers = {key: value for key, value in (exc.trailing_metadata() or ())  # type: ignore[attr-defined]
                if isinstance(value, str)}
    return error_from_grpc(code.name, exc.details() or "", trailers, operation.request_id)  # type: ignore[attr-defined]


class GRPCTransport:
    """Synchronous gRPC transport over one channel (thread-safe)."""

    def __init__(self, url: str, *, channel: grpc.Channel | None = None):
        target, secure = target_of(url)
        if channel is None:
            channel = (grpc.secure_channel(target, grpc.ssl_channel_credentials(), CHANNEL_OPTIONS) if secure
                       else grpc.insecure_channel(target, CHANNEL_OPTIONS))
        self._channel = channel
        self._stub = pb_grpc.HybridServeStub(channel)

    def handle(self, operation: Operation) -> Result:
        call = grpc_request(operation)
        rpc: Callable[..., Any] = getattr(self._stub, call.method)
        try:
            reply = rpc(call.message, timeout=call.timeout, metadata=call.metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc, operation) from None
        return from_grpc(operation, reply)

    def close(self) -> None:
        self._channel.close()


class AsyncGRPCTransport:
    """Asynchronous gRPC transport (grpc.aio); create it inside the running event loop."""

    def __init__(self, url: str, *, channel: grpc.aio.Channel | None = None):
        target, secure = target_of(url)
        if channel is None:
            channel = (grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(), CHANNEL_OPTIONS) if secure
                       else grpc.aio.insecure_channel(target, CHANNEL_OPTIONS))
        self._channel = channel
        self._stub = pb_grpc.HybridServeStub(channel)

    async def handle(self, operation: Operation) -> Result:
        call = grpc_request(operation)
        rpc: Callable[..., Any] = getattr(self._stub, call.method)
        try:
            reply = await rpc(call.message, timeout=call.timeout, metadata=call.metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc, operation) from None
        return from_grpc(operation, reply)

    async def aclose(self) -> None:
        await self._channel.close()
