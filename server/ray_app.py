"""The Ray Serve application built from a model repository, by one typed app builder.

Layout: one Serve application. Its ingress, the *gateway* deployment, serves HTTP (typed API,
docs, health) and gRPC (typed service, Open Inference Protocol) and routes every request by
model name to that model's own deployment through a DeploymentHandle; each model deployment
batches with ``@serve.batch`` and scales on its own. One application is what lets Ray Serve's
gRPC proxy route without ``application`` metadata, so tritonclient works unchanged.

``serve_config`` renders the same application as a Serve config file (``serve build``,
``serve deploy``, KubeRay's ``serveConfigV2``); ``app`` is the typed builder it names.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import Application

from hybridserve_client.schemas import BatchingInfo, ModelInfo
from hybridserve.server.adaptive import AdaptiveBatchController, BatchingChoice
from hybridserve.server import metrics
from hybridserve.server.dataplane import DataPlane, LocalEndpoint, describe
from hybridserve.server.errors import HybridServeError, ModelNotReady, as_hybridserve_error
from hybridserve.server.grpc_services import OIPServicerMixin, TaskServicerMixin
from hybridserve.server.handlers import InferenceRequest
from hybridserve.server.http_api import HTTPSettings, create_http_app
from hybridserve.server.runtime import BatchOutput, Entry, InferenceOutcome, ModelRuntime, configure_threads
from hybridserve.server.spec import ModelSpec, builtin_repository, load_repository

log = logging.getLogger("hybridserve.ray")

APP_NAME = "hybridserve"
INFO_TIMEOUT_S = 2.0


def model_deployment_name(model: str) -> str:
    return f"model-{model}"


class AppArgs(BaseModel):
    """Arguments of the application builder (the ``args`` of a Serve config file)."""

    model_config = ConfigDict(extra="forbid")
    repository: str | None = None
    device: str | None = None


def _specs(repository: str | None) -> list[ModelSpec]:
    return load_repository(Path(repository) if repository else builtin_repository())


def deployment_options(spec: ModelSpec) -> dict[str, Any]:
    """Ray Serve options of a model's deployment, all derived from its spec."""
    batching = spec.batching
    actor: dict[str, Any] = {"num_cpus": spec.device.cpus}
    if spec.device.gpus:
        actor["num_gpus"] = spec.device.gpus
    if spec.device.resources:
        actor["resources"] = dict(spec.device.resources)
    options: dict[str, Any] = {
        "ray_actor_options": actor,
        # Serve's default (5) would silently cap the batch size.
        "max_ongoing_requests": max(batching.max_queue, batching.max_batch_size * 2),
        "user_config": {"max_batch_size": batching.max_batch_size, "max_wait_ms": batching.max_wait_ms},
        "health_check_period_s": 5,
        "graceful_shutdown_timeout_s": 20,
    }
    if spec.autoscaling is not None:
        options["autoscaling_config"] = {
            "min_replicas": spec.autoscaling.min_replicas,
            "max_replicas": spec.autoscaling.max_replicas,
            "target_ongoing_requests": spec.autoscaling.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = spec.replicas
    return options


@serve.deployment
class ModelDeployment:
    """One replica of one model: loads, warms up, and batches items with ``@serve.batch``."""

    def __init__(self, spec: ModelSpec, device: str | None = None):
        metrics.instrument_ray_replica()
        configure_threads(_assigned_cpus(spec.device.cpus))
        self.spec = spec
        self.runtime = ModelRuntime(spec, device)
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


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=2000)
@serve.ingress()
class Gateway(TaskServicerMixin, OIPServicerMixin):
    """HTTP and gRPC ingress of the whole repository: routes each request by model name."""

    def __init__(self, specs: list[ModelSpec], handles: dict[str, Any]):
        metrics.instrument_ray_replica()
        self.specs = specs
        self.plane = DataPlane({spec.name: RemoteEndpoint(spec, handles[spec.name]) for spec in specs})

    def __serve_build_asgi_app__(self):
        return create_http_app(self.plane, settings=replace(HTTPSettings.from_env(), echo_request_id=False))


def app(args: AppArgs) -> Application:
    """Typed builder of the application (the import path Serve config files name)."""
    specs = _specs(args.repository)
    handles = {
        spec.name: ModelDeployment.options(name=model_deployment_name(spec.name), **deployment_options(spec))
        .bind(spec, args.device)
        for spec in specs
    }
    return Gateway.bind(specs, handles)


def serve_config(repository: str, *, host: str = "0.0.0.0", http_port: int = 8000, grpc_port: int = 9000,
                 device: str | None = None, grpc_servicer_functions: list[str] | None = None) -> dict[str, Any]:
    """A Serve config file (dict) for the repository: what ``serve deploy`` and KubeRay consume."""
    args: dict[str, Any] = {"repository": repository}
    if device:
        args["device"] = device
    deployments = [{"name": model_deployment_name(spec.name), **deployment_options(spec)}
                   for spec in _specs(repository)]
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": http_port},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": list(grpc_servicer_functions or [])},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": "hybridserve.server.ray_app:app",
            "args": args,
            "deployments": deployments,
        }],
    }
