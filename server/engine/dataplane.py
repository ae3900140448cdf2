"""The transport-agnostic data plane: what every API (typed HTTP, OIP HTTP/gRPC, typed gRPC) calls.

A ``DataPlane`` holds one *endpoint* per model. An endpoint is either local (a ``ModelRuntime``
in this process with its batch queue) or remote (a Ray Serve handle to the model's
deployment); the data plane does not care which. Adapters translate their protocol into
``DataPlane.infer`` and map ``HybridServeError`` through the one error table.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from hybridserve_client.schemas import BatchingInfo, Health, InputContract, ModelInfo, ModelList
from hybridserve.server.compiler.runner import CompileResult
from hybridserve.server.core.errors import DeadlineExceeded, ModelNotFound, WrongTask
from hybridserve.server.tasks import InferenceRequest
from hybridserve.server.engine.runtime import BatchOutput, Entry, InferenceOutcome, ModelRuntime
from hybridserve.server.core.spec import ModelSpec


def describe(spec: ModelSpec, status: str, reason: str | None = None, backend: str | None = None,
             load_seconds: float | None = None, device: str | None = None,
             batching: BatchingInfo | None = None, compiled: CompileResult | None = None) -> ModelInfo:
    pre = spec.preprocessing
    restoring = spec.restoration is not None  # tiles, at a scale
    return ModelInfo(
        name=spec.name,
        task=spec.task,
        verb=spec.verb,
        architecture=spec.architecture,
        status=status,
        reason=reason,
        input=InputContract(
            input_size=pre.input_size,
            resize=pre.resize if not restoring else "tiles",
            color=pre.color,
            scale=spec.architecture_args.get("scale") if restoring else None,
            tile=pre.tile if restoring else None,
            tile_overlap=pre.tile_overlap if restoring else None,
            needs_reference=spec.needs_reference,
        ),
        batching=batching or BatchingInfo(
            max_batch_size=spec.batching.max_batch_size,
            max_wait_ms=spec.batching.max_wait_ms,
            latency_slo_ms=spec.batching.latency_slo_ms,
        ),
        labels=len(spec.labels),
        backend=backend,
        precision=compiled.precision if compiled else None,
        precision_reason=compiled and (compiled.precision_reason or (compiled.gate or {}).get("reason")),
        fp32_layers=list(compiled.fp32_layers) if compiled else [],
        device=device or spec.device.type,
        load_seconds=load_seconds,
        description=spec.description,
    )


class ModelEndpoint(Protocol):
    spec: ModelSpec

    async def info(self) -> ModelInfo: ...

    async def infer(self, request: InferenceRequest, timeout_s: float | None) -> InferenceOutcome: ...


class LocalEndpoint:
    """A model in this process: its runtime plus the function that queues an item for batching."""

    def __init__(self, runtime: ModelRuntime, submit: Callable[[Entry], Awaitable[BatchOutput]],
                 batching: Callable[[], BatchingInfo] | None = None):
        self.runtime = runtime
        self.spec = runtime.spec
        self._submit = submit
        self._batching = batching

    async def info(self) -> ModelInfo:
        rt = self.runtime
        batching = self._batching() if self._batching else None
        return describe(rt.spec, rt.status, rt.reason, rt.backend, rt.load_seconds, rt.device.type, batching,
                        rt.compiled)

    async def infer(self, request: InferenceRequest, timeout_s: float | None) -> InferenceOutcome:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        return await self.runtime.infer(request, self._submit, deadline)


class DataPlane:
    def __init__(self, endpoints: dict[str, ModelEndpoint]):
        self.endpoints = endpoints

    def endpoint(self, name: str) -> ModelEndpoint:
        try:
            return self.endpoints[name]
        except KeyError:
            raise ModelNotFound(f"no model named {name!r}; GET /v1/models lists the models") from None

    async def list_models(self) -> ModelList:
        infos = await asyncio.gather(*(ep.info() for ep in self.endpoints.values()))
        return ModelList(models=list(infos))

    async def model_info(self, name: str) -> ModelInfo:
        return await self.endpoint(name).info()

    async def health(self) -> Health:
        models = {info.name: info.status for info in (await self.list_models()).models}
        ok = bool(models) and all(status == "ready" for status in models.values())
        return Health(status="ok" if ok else "unavailable", models=models)

    async def infer(self, name: str, verb: str | None, request: InferenceRequest,
                    timeout_s: float | None = None) -> InferenceOutcome:
        endpoint = self.endpoint(name)
        if verb is not None and verb != endpoint.spec.verb:
            raise WrongTask(
                f"model {name!r} does {endpoint.spec.task}: use POST /v1/models/{name}/{endpoint.spec.verb}, not /{verb}"
            )
        try:
            if timeout_s is None:
                return await endpoint.infer(request, None)
            return await asyncio.wait_for(endpoint.infer(request, timeout_s), timeout_s)
        except TimeoutError:
            raise DeadlineExceeded(f"no answer from model {name!r} within {timeout_s:g}s") from None
