"""The Ray Serve deployments: a model's replica, and the gateway (the ingress) in its two layouts.

* ``ModelDeployment``: one replica of one model (``ModelRuntime``): loads, warms up, and runs
  the batches ingress replicas send it (``run_batch``), one at a time on its batch thread.
* ``Gateway`` (``deployments`` layout): HTTP and gRPC ingress whose endpoints decode, preprocess
  and batch here, then reach each model's deployment once per batch (``remote.RayBatcher``).
* ``CombinedGateway`` (``combined`` layout): every model loaded and batched in the gateway
  replica, exactly as ``--no-ray`` does; no hop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from hybridserve.server.core.settings import Settings
from hybridserve.server.core.spec import ModelSpec
from hybridserve.server.engine.cores import batch_thread
from hybridserve.server.engine.dataplane import DataPlane
from hybridserve.server.engine.endpoint import Endpoint
from hybridserve.server.engine.local import local_plane
from hybridserve.server.engine.runtime import (
    BatchOutput, ModelState, ModelRuntime, configure_threads, model_threads, work_pool,
)
from hybridserve.server.observability import metrics, runtime_metrics
from hybridserve.server.rayserve.cluster import guard_draining
from hybridserve.server.rayserve.options import GATEWAY
from hybridserve.server.rayserve.remote import RayBatcher, RemoteModel, batch_entries, to_arrays
from hybridserve.server.transports.grpc_services import OIPServicerMixin, TaskServicerMixin
from hybridserve.server.transports.http_api import create_http_app


def _assigned_cpus(default: float) -> float:
    try:
        import ray

        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", default))
    except Exception:
        return default


@serve.deployment
class ModelDeployment:
    """One replica of one model: where its batches compute."""

    async def __init__(self, spec: ModelSpec, device: str | None = None):
        metrics.instrument_ray_replica()
        configure_threads(_assigned_cpus(spec.device.cpus))
        self.spec = spec
        self.runtime = ModelRuntime(spec, device, Settings.from_env().limits, runtime_metrics)
        await asyncio.to_thread(self.runtime.load)  # the replica's loop stays free for Serve's calls
        # Batches run on their own thread (on cores of its own where free: engine/cores.py), one at a
        # time, while the replica's loop takes the next call.
        self._batch_thread, _ = batch_thread(model_threads(spec))

    async def describe(self) -> tuple[ModelState, dict | None]:
        """How the model stands, and (once ready) the traits an ingress builds its handler from."""
        ready = self.runtime.status == "ready"
        return self.runtime.state(), (self.runtime.traits() if ready else None)

    async def run_batch(self, payload: list[tuple[Any, float | None]]) -> list[BatchOutput]:
        entries = batch_entries(payload)
        loop = asyncio.get_running_loop()
        outputs = await loop.run_in_executor(self._batch_thread, self.runtime.run_batch, entries)
        for out in outputs:
            out.output = to_arrays(out.output)
        return outputs


# The gateway writes one request log line per request (observability.logs.log_request: model,
# outcome, timings, request id); Serve's access log line would be a second, less complete one.
GATEWAY_LOGGING = {"enable_access_log": False}


class _Ingress(TaskServicerMixin, OIPServicerMixin):
    """HTTP (FastAPI) and gRPC servicer methods over ``self.plane``."""

    def __serve_build_asgi_app__(self):
        app = create_http_app(self.plane, self.settings, echo_request_id=False)
        return guard_draining(app)  # SIGTERM drain: readiness and new calls 503 (rayserve/cluster.py)


@serve.deployment(name=GATEWAY, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=2000,
                  logging_config=GATEWAY_LOGGING)
@serve.ingress()
class Gateway(_Ingress):
    """Ingress of the ``deployments`` layout: decodes and batches here, one hop per batch per model."""

    def __init__(self, specs: list[ModelSpec], handles: dict[str, Any]):
        metrics.instrument_ray_replica()
        configure_threads(1)  # preprocess and postprocess only; the models compute in their replicas
        settings = Settings.from_env()
        self.specs = specs
        work = work_pool()
        endpoints = {spec.name: Endpoint(RemoteModel(spec, handles[spec.name], settings.limits),
                                         RayBatcher(spec, handles[spec.name]), runtime_metrics, work) for spec in specs}
        self.init_services(DataPlane(endpoints), settings)


@serve.deployment(name=GATEWAY, logging_config=GATEWAY_LOGGING)
@serve.ingress()
class CombinedGateway(_Ingress):
    """Ingress of the ``combined`` layout: every model loaded and batched in this replica."""

    async def __init__(self, specs: list[ModelSpec], device: str | None = None):
        metrics.instrument_ray_replica()
        # Each model's batches run on their own thread, concurrently: each gets its own spec's threads.
        configure_threads(max(spec.device.cpus for spec in specs))
        settings = Settings.from_env()
        self.specs = specs
        # Loading takes minutes: on a thread, so the replica's loop (which runs user code too,
        # app.SERVE_ENV) keeps answering Serve's calls meanwhile.
        plane = await asyncio.to_thread(local_plane, specs, device, settings.limits, runtime_metrics)
        self.init_services(plane, settings)
