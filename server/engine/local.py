"""In-process serving: every model in this process, batched by ``AsyncBatcher``.

What ``hybridserve serve --no-ray`` and the Ray ``combined`` layout's gateway run, and where Ray
is absent (a bare GPU box, benchmarks of the limit). The endpoints, handlers and transports are
the same objects the per-model Ray layout runs in its ingress.
"""

from __future__ import annotations

from concurrent.futures import Executor

from hybridserve.server.core.images import ImageLimits
from hybridserve.server.core.spec import ModelSpec
from hybridserve.server.engine.batching import AsyncBatcher
from hybridserve.server.engine.dataplane import DataPlane
from hybridserve.server.engine.endpoint import Endpoint, LocalModel
from hybridserve.server.engine.observer import NULL_OBSERVER, RuntimeObserver
from hybridserve.server.engine.runtime import ModelRuntime, model_threads, work_pool


def local_endpoint(spec: ModelSpec, device: str | None = None, limits: ImageLimits | None = None,
                   observer: RuntimeObserver = NULL_OBSERVER, work: Executor | None = None) -> Endpoint:
    """Load one model (with warm-up) and put an in-process batcher in front of it."""
    runtime = ModelRuntime(spec, device, limits, observer)
    runtime.load()
    batching = spec.batching
    batcher = AsyncBatcher(runtime.run_batch, batching.max_batch_size, batching.max_wait_ms, batching.latency_slo_ms,
                           tune=batching.tune, pin=model_threads(spec))
    return Endpoint(LocalModel(runtime), batcher, observer, work)


def local_plane(specs: list[ModelSpec], device: str | None = None, limits: ImageLimits | None = None,
                observer: RuntimeObserver = NULL_OBSERVER, work_threads: int = 1) -> DataPlane:
    """Every model in this process; their pre/postprocess share ``work_threads`` threads."""
    work = work_pool(work_threads)
    return DataPlane({spec.name: local_endpoint(spec, device, limits, observer, work) for spec in specs})
