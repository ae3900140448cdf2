"""In-process serving: every model in this process, batched by ``AsyncBatcher``.

What ``hybridserve serve --no-ray`` and the Ray ``combined`` layout's gateway run, and where Ray
is absent (a bare GPU box, benchmarks of the limit). The endpoints, handlers and transports are
the same objects the per-model Ray layout runs in its ingress.
"""

from __future__ import annotations

from hybridserve.server.core.images import ImageLimits
from hybridserve.server.core.spec import ModelSpec
from hybridserve.server.engine.batching import AsyncBatcher
from hybridserve.server.engine.dataplane import DataPlane
from hybridserve.server.engine.endpoint import Endpoint, LocalModel
from hybridserve.server.engine.observer import NULL_OBSERVER, RuntimeObserver
from hybridserve.server.engine.runtime import ModelRuntime


def local_endpoint(spec: ModelSpec, device: str | None = None, limits: ImageLimits | None = None,
                   observer: RuntimeObserver = NULL_OBSERVER) -> Endpoint:
    """Load one model (with warm-up) and put an in-process batcher in front of it."""
    runtime = ModelRuntime(spec, device, limits, observer)
    runtime.load()
    batching = spec.batching
    batcher = AsyncBatcher(runtime.run_batch, batching.max_batch_size, batching.max_wait_ms, batching.latency_slo_ms,
                           tune=batching.tune)
    return Endpoint(LocalModel(runtime), batcher, observer)


def local_plane(specs: list[ModelSpec], device: str | None = None, limits: ImageLimits | None = None,
                observer: RuntimeObserver = NULL_OBSERVER) -> DataPlane:
    return DataPlane({spec.name: local_endpoint(spec, device, limits, observer) for spec in specs})
