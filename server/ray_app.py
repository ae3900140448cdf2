"""Ray Serve applications built from a model repository, by one typed app builder.

Topology (chosen by measurement, see BENCHMARKS.md): every model is its own Serve application
whose deployment is its own FastAPI ingress at ``/v1/models/{name}``, so a request reaches the
replica that batches it without an extra DeploymentHandle hop. A small *control* application
at ``/`` serves the model list, health, OpenAPI docs and the protocols that route by model
name inside the request (Open Inference Protocol, gRPC) through handles.

``serve_config`` renders the same applications as a Serve config file (``serve build``,
``serve deploy``, KubeRay's ``serveConfigV2``): builders ``model_app`` and ``control_app``
are the import paths it names.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import Application

from hybridserve_client.schemas import BatchingInfo, ModelInfo
from hybridserve.server.dataplane import DataPlane, LocalEndpoint, describe
from hybridserve.server.errors import ModelNotReady
from hybridserve.server.handlers import InferenceRequest
from hybridserve.server.http_api import create_http_app
from hybridserve.server.runtime import BatchOutput, Entry, InferenceOutcome, ModelRuntime, configure_threads
from hybridserve.server.spec import ModelSpec, builtin_repository, load_repository

log = logging.getLogger("hybridserve.ray")

CONTROL_APP = "hybridserve"
INFO_TIMEOUT_S = 2.0


def model_app_name(model: str) -> str:
    return f"model-{model}"


def model_route(model: str) -> str:
    return f"/v1/models/{model}"


class ModelAppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    repository: str | None = None
    model: str
    device: str | None = None


class ControlAppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    repository: str | None = None


def _specs(repository: str | None) -> list[ModelSpec]:
    return load_repository(Path(repository) if repository else builtin_repository())


def _spec(repository: str | None, model: str) -> ModelSpec:
    for spec in _specs(repository):
        if spec.name == model:
            return spec
    raise ValueError(f"model {model!r} is not in repository {repository or builtin_repository()}")


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
@serve.ingress()
class ModelDeployment:
    """One replica of one model: loads, warms up, batches with ``@serve.batch``, serves HTTP."""

    def __init__(self, args: ModelAppArgs):
        spec = _spec(args.repository, args.model)
        cpus = _assigned_cpus(spec.device.cpus)
        configure_threads(cpus)
        self.spec = spec
        self.runtime = ModelRuntime(spec, args.device)
        self.runtime.load()
        self.plane = DataPlane({spec.name: LocalEndpoint(self.runtime, self._submit, self._batching)})

    def __serve_build_asgi_app__(self):
        return create_http_app(self.plane, model=self.spec.name)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Change batching in place (Serve calls this on a new ``user_config``, no restart)."""
        self._submit.set_max_batch_size(int(user_config.get("max_batch_size", self.spec.batching.max_batch_size)))
        wait_ms = float(user_config.get("max_wait_ms", self.spec.batching.max_wait_ms))
        self._submit.set_batch_wait_timeout_s(wait_ms / 1000.0)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _submit(self, entries: list[Entry]) -> list[BatchOutput]:
        return await asyncio.to_thread(self.runtime.run_batch, entries)

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
    """A model served by its own Serve application, reached through a DeploymentHandle."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self._handle = None

    @property
    def handle(self):
        if self._handle is None:
            self._handle = serve.get_deployment_handle("ModelDeployment", app_name=model_app_name(self.spec.name))
        return self._handle

    async def info(self) -> ModelInfo:
        try:
            return await asyncio.wait_for(self.handle.info.remote(), INFO_TIMEOUT_S)
        except Exception as exc:  # not deployed yet, still loading, or its replica died
            return describe(self.spec, "loading", reason=f"no replica answered ({type(exc).__name__})")

    async def infer(self, request: InferenceRequest, timeout_s: float | None) -> InferenceOutcome:
        try:
            return await self.handle.infer.remote(request, timeout_s)
        except Exception as exc:
            from hybridserve.server.errors import HybridServeError, as_hybridserve_error

            error = as_hybridserve_error(exc)
            if isinstance(error, HybridServeError) and error.code != "internal":
                raise error from None
            raise ModelNotReady(f"model {self.spec.name!r} is unavailable ({type(exc).__name__})",
                                retry_after=1.0) from None


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress()
class ControlDeployment:
    """Model list, health and docs for the whole repository; routes by model name through handles."""

    def __init__(self, args: ControlAppArgs):
        self.specs = _specs(args.repository)
        self.plane = DataPlane({spec.name: RemoteEndpoint(spec) for spec in self.specs})

    def __serve_build_asgi_app__(self):
        return create_http_app(self.plane)


def model_app(args: ModelAppArgs) -> Application:
    """Typed builder of one model's application (import path for Serve config files)."""
    spec = _spec(args.repository, args.model)
    return ModelDeployment.options(**deployment_options(spec)).bind(args)


def control_app(args: ControlAppArgs) -> Application:
    """Typed builder of the control application (import path for Serve config files)."""
    return ControlDeployment.bind(args)


def build_targets(repository: str | None, device: str | None = None) -> list[serve.RunTarget]:
    """Every application of a repository, ready for ``serve.run_many``."""
    from ray.serve.api import RunTarget

    targets = [
        RunTarget(model_app(ModelAppArgs(repository=repository, model=spec.name, device=device)),
                  name=model_app_name(spec.name), route_prefix=model_route(spec.name))
        for spec in _specs(repository)
    ]
    targets.append(RunTarget(control_app(ControlAppArgs(repository=repository)), name=CONTROL_APP, route_prefix="/"))
    return targets


def serve_config(repository: str, *, host: str = "0.0.0.0", http_port: int = 8000, grpc_port: int = 9000,
                 device: str | None = None) -> dict[str, Any]:
    """A Serve config file (dict) for the repository: what ``serve deploy`` and KubeRay consume."""
    applications = []
    for spec in _specs(repository):
        options = deployment_options(spec)
        args = {"repository": repository, "model": spec.name}
        if device:
            args["device"] = device
        applications.append({
            "name": model_app_name(spec.name),
            "route_prefix": model_route(spec.name),
            "import_path": "hybridserve.server.ray_app:model_app",
            "args": args,
            "deployments": [{"name": "ModelDeployment", **options}],
        })
    applications.append({
        "name": CONTROL_APP,
        "route_prefix": "/",
        "import_path": "hybridserve.server.ray_app:control_app",
        "args": {"repository": repository},
    })
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": http_port},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": []},
        "applications": applications,
    }
