"""The transport-agnostic data plane: what every API (typed HTTP, OIP HTTP/gRPC, typed gRPC) calls.

A ``DataPlane`` holds one ``Endpoint`` per model (``engine.endpoint``): its per-request pipeline
and batcher, in front of a model that computes in this process or behind a per-batch Ray hop;
the data plane does not care which. It sets each request's deadline, once. Adapters translate their protocol into
``DataPlane.infer`` and map ``HybridServeError`` through the one error table.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from hybridserve_client.schemas import BatchingInfo, Health, InputContract, ModelInfo, ModelList
from hybridserve.server.core.errors import DeadlineExceeded, ModelNotFound, WrongTask
from hybridserve.server.tasks import TASKS, InferenceRequest
from hybridserve.server.engine.runtime import InferenceOutcome, ModelState
from hybridserve.server.core.spec import ModelSpec


def describe(spec: ModelSpec, state: ModelState, batching: BatchingInfo | None = None) -> ModelInfo:
    pre = spec.preprocessing
    task = TASKS[spec.task]
    tiles = task.tiles(spec)
    return ModelInfo(
        name=spec.name,
        task=spec.task,
        verb=spec.verb,
        architecture=spec.architecture,
        status=state.status,
        reason=state.reason,
        input=InputContract(
            input_size=pre.input_size,
            resize="tiles" if tiles else pre.resize,
            color=pre.color,
            scale=task.output_scale(spec),
            tile=pre.tile if tiles else None,
            tile_overlap=pre.tile_overlap if tiles else None,
            needs_reference=spec.needs_reference,
        ),
        batching=batching or BatchingInfo(
            max_batch_size=spec.batching.max_batch_size,
            max_wait_ms=spec.batching.max_wait_ms,
            latency_slo_ms=spec.batching.latency_slo_ms,
        ),
        labels=len(spec.labels),
        backend=state.backend,
        precision=state.precision,
        precision_reason=state.precision_reason,
        fp32_layers=list(state.fp32_layers),
        device=state.device or spec.device.type,
        load_seconds=state.load_seconds,
        description=spec.description,
    )


class ModelEndpoint(Protocol):
    spec: ModelSpec

    async def info(self) -> ModelInfo: ...

    async def infer(self, request: InferenceRequest, deadline: float | None) -> InferenceOutcome: ...


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
        TASKS[endpoint.spec.task].check_options(request.options)
        # The deadline is set here, once, as an absolute time: it bounds the wait and rides on the items.
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            async with asyncio.timeout_at(deadline):  # the loop's clock is time.monotonic
                return await endpoint.infer(request, deadline)
        except TimeoutError:
            raise DeadlineExceeded(f"no answer from model {name!r} within {timeout_s:g}s") from None
