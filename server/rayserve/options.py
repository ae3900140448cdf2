"""Ray Serve options derived from the specs, and the choice of layout.

``choose_layout`` picks ``combined`` (every model in the gateway replica: no hop) where the
repository fits one node as one unit, and ``deployments`` (one deployment per model behind a
per-batch hop) where a model needs its own scaling, replicas, GPUs or custom resources, or the
models together need more CPUs than a node has.
"""

from __future__ import annotations

from typing import Any, Literal

from hybridserve.server.core.spec import ModelSpec

Layout = Literal["auto", "deployments", "combined"]
GATEWAY = "Gateway"
MODEL_BATCHES_IN_FLIGHT = 8  # batch calls a model replica takes at once (they queue on its batch thread)


def choose_layout(specs: list[ModelSpec], requested: Layout = "auto", node_cpus: float | None = None) -> tuple[str, str]:
    """The layout to deploy and why (the serve banner prints the reason)."""
    if requested != "auto":
        return requested, "as asked (--layout)"
    for spec in specs:
        if spec.autoscaling is not None or spec.replicas > 1:
            return "deployments", f"model {spec.name!r} scales on its own (replicas or autoscaling)"
        if spec.device.gpus or spec.device.resources:
            return "deployments", f"model {spec.name!r} asks for GPUs or custom resources of its own"
    wanted = sum(spec.device.cpus for spec in specs)
    if node_cpus is not None and wanted > node_cpus:
        return "deployments", f"the models want {wanted:g} CPUs together, more than a node's {node_cpus:g}"
    return "combined", "every model fits one node as one unit: no hop between processes"


def model_deployment_name(model: str) -> str:
    return f"model-{model}"


def _actor_options(cpus: float, gpus: float, resources: dict[str, float]) -> dict[str, Any]:
    actor: dict[str, Any] = {"num_cpus": cpus}
    if gpus:
        actor["num_gpus"] = gpus
    if resources:
        actor["resources"] = dict(resources)
    return actor


def _scaling_options(specs: list[ModelSpec], least: int = 1) -> dict[str, Any]:
    """Replicas of a deployment that serves ``specs``: the largest count or autoscaling bounds any asks for."""
    scaled = [spec.autoscaling for spec in specs if spec.autoscaling is not None]
    if not scaled:
        return {"num_replicas": max(least, *(spec.replicas for spec in specs))}
    fixed = [least] + [spec.replicas for spec in specs if spec.autoscaling is None]
    return {"autoscaling_config": {
        "min_replicas": max([a.min_replicas for a in scaled] + fixed),
        "max_replicas": max([a.max_replicas for a in scaled] + fixed),
        "target_ongoing_requests": sum(a.target_ongoing_requests for a in scaled),
    }}


def _max_ongoing(spec: ModelSpec) -> int:
    # Serve's default (5) would silently cap the batch size.
    return max(spec.batching.max_queue, spec.batching.max_batch_size * 2)


def deployment_options(spec: ModelSpec) -> dict[str, Any]:
    """Ray Serve options of a model's deployment, all derived from its spec. Its calls are whole
    batches from the ingress replicas, a few at a time per replica."""
    return {
        "ray_actor_options": _actor_options(spec.device.cpus, spec.device.gpus, spec.device.resources),
        "max_ongoing_requests": MODEL_BATCHES_IN_FLIGHT,
        "health_check_period_s": 5,
        "graceful_shutdown_timeout_s": 20,
        **_scaling_options([spec]),
    }


def combined_options(specs: list[ModelSpec], replicas: int = 1) -> dict[str, Any]:
    """Ray Serve options of the combined gateway: the sum of its models' resources and queues; at
    least ``replicas`` replicas (each a whole server: HTTP, decoding and every model)."""
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
        **_scaling_options(specs, replicas),
    }
