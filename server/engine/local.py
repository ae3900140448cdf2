"""In-process serving without Ray: every model in this process, batched by ``AsyncBatcher``.

Used where Ray is absent (a bare GPU box, benchmarks of the limit) and by ``hybridserve serve
--no-ray``. The data plane, handlers and HTTP API are the same objects Ray Serve runs.
"""

from __future__ import annotations

from hybridserve_client.schemas import BatchingInfo
from hybridserve.server.engine.batching import AsyncBatcher
from hybridserve.server.engine.dataplane import DataPlane, LocalEndpoint
from hybridserve.server.engine.observer import NULL_OBSERVER, RuntimeObserver
from hybridserve.server.engine.runtime import ModelRuntime
from hybridserve.server.core.images import ImageLimits
from hybridserve.server.core.spec import ModelSpec


def local_endpoint(spec: ModelSpec, device: str | None = None, limits: ImageLimits | None = None,
                   observer: RuntimeObserver = NULL_OBSERVER) -> LocalEndpoint:
    """Load one model (with warm-up) and put an in-process batcher in front of it."""
    runtime = ModelRuntime(spec, device, limits, observer)
    runtime.load()
    batcher = AsyncBatcher(runtime.run_batch, spec.batching.max_batch_size, spec.batching.max_wait_ms,
                           spec.batching.latency_slo_ms)

    def batching() -> BatchingInfo:
        return BatchingInfo(max_batch_size=batcher.max_batch_size, max_wait_ms=batcher.max_wait_s * 1000.0,
                            latency_slo_ms=spec.batching.latency_slo_ms)

    return LocalEndpoint(runtime, batcher.submit, batching)


def local_plane(specs: list[ModelSpec], device: str | None = None, limits: ImageLimits | None = None,
                observer: RuntimeObserver = NULL_OBSERVER) -> DataPlane:
    return DataPlane({spec.name: local_endpoint(spec, device, limits, observer) for spec in specs})
