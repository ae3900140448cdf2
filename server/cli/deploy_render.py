"""Kubernetes manifests for a model repository: a KubeRay ``RayService`` and what surrounds it.

``hybridserve deploy render`` turns a model repository into manifests:

* a ``RayService`` (``ray.io/v1``) whose ``serveConfigV2`` is :func:`serve_config` of the
  repository, with a head group (no replicas on it), a CPU worker group, and a GPU worker group
  (``nvidia.com/gpu``, tolerations, node selector) when a model asks for a GPU; Ray's autoscaler
  is on, and worker group bounds follow the replicas the specs ask for; its ``serveService``
  carries HTTP (8000) and gRPC (9000) and always points at the cluster that is serving; every
  pod's environment turns on Ray Serve's HAProxy ingress and user code on the replicas' loops
  (``rayserve.app.HAPROXY_ENV``, ``SERVE_ENV``);
* a headless Service for Ray's Prometheus metrics (8080), a PodDisruptionBudget for the
  workers, a PersistentVolumeClaim for the compile and weights cache, and optionally a
  PodMonitor (prometheus-operator).

With ``--kustomize DIR`` it writes the generated files of the kustomize tree in ``deploy/``:
``base/hybridserve.yaml`` (what CPU and GPU share), ``overlays/{cpu,gpu}/rayservice.yaml`` and
``components/monitoring/podmonitor.yaml``; the ``kustomization.yaml`` files are hand-written.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

NAME = "hybridserve"
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 9000, 8080
MODEL_ROOT = "/models"  # the repository inside the image (baked in, or a mounted claim)
CACHE_ROOT = "/cache"  # weights downloaded from hubs, compile artifacts
USER_ID = 1000  # the image's non-root user
# Stopping a pod: the preStop sleep lets Services drop it and its in-flight requests finish before Ray stops.
PRESTOP_SLEEP_S, TERMINATION_GRACE_S = 20, 60
DEFAULT_GPUS_PER_REPLICA = 0.125
APP_LABELS = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/part-of": NAME}
CACHE_ENV = {
    "HYBRIDSERVE_CACHE": CACHE_ROOT,
    "HF_HOME": f"{CACHE_ROOT}/huggingface",
    "TORCHINDUCTOR_CACHE_DIR": f"{CACHE_ROOT}/inductor",
    "TRITON_CACHE_DIR": f"{CACHE_ROOT}/triton",
}


@dataclass(frozen=True)
class PodSize:
    """Container resources of one Ray node (requests equal limits: Guaranteed QoS, as Ray advises)."""

    cpus: int
    memory: str
    shm: str
    gpus: int = 0


HEAD_SIZE = PodSize(cpus=2, memory="8Gi", shm="1Gi")
CPU_WORKER_SIZE = PodSize(cpus=4, memory="8Gi", shm="2Gi")
GPU_WORKER_SIZE = PodSize(cpus=8, memory="32Gi", shm="8Gi", gpus=1)


@dataclass(frozen=True)
class RenderOptions:
    repository: Path
    gpu: bool = False
    image: str | None = None
    gpus_per_replica: float = DEFAULT_GPUS_PER_REPLICA
    models_claim: str | None = None
    cache_claim: str = f"{NAME}-cache"
    cache_size: str = "20Gi"


@dataclass(frozen=True)
class Demand:
    """Ray resources the model replicas ask for, at their minimum and maximum replica counts."""

    cpus: tuple[float, float] = (0.0, 0.0)
    gpus: tuple[float, float] = (0.0, 0.0)

    def add(self, cpus: float, gpus: float, low: int, high: int) -> Demand:
        return Demand((self.cpus[0] + cpus * low, self.cpus[1] + cpus * high),
                      (self.gpus[0] + gpus * low, self.gpus[1] + gpus * high))

    def pods(self, size: PodSize) -> tuple[int, int]:
        """(min, max) pods of ``size`` that hold these replicas."""
        def count(cpus: float, gpus: float) -> int:
            by_gpu = math.ceil(gpus / size.gpus - 1e-9) if size.gpus else 0
            return max(math.ceil(cpus / size.cpus - 1e-9), by_gpu)
        low = count(self.cpus[0], self.gpus[0])
        return low, max(low, count(self.cpus[1], self.gpus[1]), 1)


def cluster_serve_config(options: RenderOptions) -> dict[str, Any]:
    """The Serve config of the repository as the cluster runs it (repository at MODEL_ROOT)."""
    from hybridserve.server.cli.serve import grpc_servicers
    from hybridserve.server.rayserve.app import serve_config

    # A deployment per model: what a platform team scales, places and budgets one by one.
    config = serve_config(str(options.repository), host="0.0.0.0", http_port=HTTP_PORT, grpc_port=GRPC_PORT,
                          device="cuda" if options.gpu else None, grpc_servicer_functions=grpc_servicers(),
                          layout="deployments")
    app = config["applications"][0]
    app["args"]["repository"] = MODEL_ROOT
    if options.gpu:
        for deployment in app["deployments"]:
            deployment["ray_actor_options"].setdefault("num_gpus", options.gpus_per_replica)
    return config


def replica_bounds(deployment: dict[str, Any]) -> tuple[int, int]:
    scaling = deployment.get("autoscaling_config")
    if scaling:
        return scaling["min_replicas"], scaling["max_replicas"]
    return deployment["num_replicas"], deployment["num_replicas"]


def demands(config: dict[str, Any]) -> tuple[Demand, Demand]:
    """(CPU-node demand, GPU-node demand): a replica that asks for a GPU lives on a GPU node."""
    on_cpu, on_gpu = Demand(), Demand()
    for deployment in config["applications"][0]["deployments"]:
        actor = deployment["ray_actor_options"]
        low, high = replica_bounds(deployment)
        cpus, gpus = actor.get("num_cpus", 1), actor.get("num_gpus", 0)
        if gpus:
            on_gpu = on_gpu.add(cpus, gpus, low, high)
        else:
            on_cpu = on_cpu.add(cpus, 0, low, high)
    return on_cpu, on_gpu


def custom_resources(config: dict[str, Any]) -> list[str]:
    """Custom Ray resources the replicas ask for (no worker group here offers them)."""
    return sorted({name for deployment in config["applications"][0]["deployments"]
                   for name in deployment["ray_actor_options"].get("resources", {})})


def _metadata(name: str, **labels: str) -> dict[str, Any]:
    return {"name": name, "labels": {**APP_LABELS, **labels}}


def _port(name: str, number: int) -> dict[str, Any]:
    return {"name": name, "containerPort": number, "protocol": "TCP"}


def _resources(size: PodSize) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": str(size.cpus), "memory": size.memory}
    if size.gpus:
        amounts["nvidia.com/gpu"] = str(size.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def pod_template(options: RenderOptions, image: str, role: str, size: PodSize,
                 ports: list[dict[str, Any]]) -> dict[str, Any]:
    """The pod of one Ray node: the image, its resources, cache and repository volumes, probes; its
    environment turns on HAProxy ingress and user code on the replicas' loops (every Ray process
    reads it, so every node sets it)."""
    from hybridserve.server.rayserve.app import HAPROXY_ENV, SERVE_ENV

    mounts = [{"name": "cache", "mountPath": CACHE_ROOT}, {"name": "dshm", "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [
        {"name": "cache", "persistentVolumeClaim": {"claimName": options.cache_claim}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size.shm}},
    ]
    if options.models_claim:
        mounts.append({"name": "models", "mountPath": MODEL_ROOT, "readOnly": True})
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": options.models_claim,
                                                                    "readOnly": True}})
    container: dict[str, Any] = {
        "name": f"ray-{'head' if role == 'head' else 'worker'}",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": [{"name": key, "value": value} for key, value in {**CACHE_ENV, **SERVE_ENV, **HAPROXY_ENV}.items()],
        "ports": ports,
        "resources": _resources(size),
        "volumeMounts": mounts,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", f"sleep {PRESTOP_SLEEP_S}"]}}},
    }
    if role != "head":
        # Traffic only to pods whose Serve proxy answers and whose models are all warmed up. Liveness
        # stays KubeRay's raylet check: a worker without replicas has no proxy, and is still alive.
        # The head keeps KubeRay's probes too: the operator deploys the app once the head is ready.
        container["readinessProbe"] = {
            "httpGet": {"path": "/readyz", "port": "serve"},
            "initialDelaySeconds": 10, "periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 3,
        }
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "securityContext": {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID, "fsGroup": USER_ID},
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "nodeSelector": {"kubernetes.io/os": "linux"},
    }
    if size.gpus:
        spec["nodeSelector"]["nvidia.com/gpu.present"] = "true"
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": {**APP_LABELS, "app.kubernetes.io/component": role}}, "spec": spec}


def _worker_ports() -> list[dict[str, Any]]:
    return [_port("serve", HTTP_PORT), _port("grpc", GRPC_PORT), _port("metrics", METRICS_PORT)]


def worker_group(options: RenderOptions, image: str, name: str, size: PodSize,
                 pods: tuple[int, int]) -> dict[str, Any]:
    return {
        "groupName": name,
        "replicas": pods[0],
        "minReplicas": pods[0],
        "maxReplicas": pods[1],
        "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
        "template": pod_template(options, image, f"worker-{name}", size, _worker_ports()),
    }


def rayservice(options: RenderOptions, config: dict[str, Any]) -> dict[str, Any]:
    on_cpu, on_gpu = demands(config)
    uses_gpu = bool(on_gpu.gpus[1])
    image = options.image or f"{NAME}:{'gpu' if uses_gpu else 'cpu'}"  # one image for every Ray node
    head_ports = [_port("gcs", 6379), _port("dashboard", 8265), _port("client", 10001), *_worker_ports()]
    groups = [worker_group(options, image, "cpu", CPU_WORKER_SIZE, on_cpu.pods(CPU_WORKER_SIZE))]
    if uses_gpu:
        groups.append(worker_group(options, image, "gpu", GPU_WORKER_SIZE, on_gpu.pods(GPU_WORKER_SIZE)))
    import ray

    ray_version = ".".join(ray.__version__.split(".")[:2]) + ".0"  # the image's Ray: pinned to a minor
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _metadata(NAME),
        "spec": {
            "upgradeStrategy": {"type": "NewCluster"},
            "serveService": {
                "metadata": _metadata(NAME),
                "spec": {"type": "ClusterIP", "ports": [
                    {"name": "serve", "port": HTTP_PORT, "targetPort": HTTP_PORT, "protocol": "TCP"},
                    {"name": "grpc", "port": GRPC_PORT, "targetPort": GRPC_PORT, "protocol": "TCP",
                     "appProtocol": "grpc"},
                ]},
            },
            "serveConfigV2": yaml.safe_dump(config, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": ray_version,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 120},
                "headGroupSpec": {
                    # num-cpus 0: no model replica on the head, which runs GCS, the Serve controller and a proxy.
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0",
                                       "metrics-export-port": str(METRICS_PORT)},
                    "template": pod_template(options, image, "head", HEAD_SIZE, head_ports),
                },
                "workerGroupSpecs": groups,
            },
        },
    }


def cache_claim(options: RenderOptions) -> dict[str, Any]:
    """Shared by every pod (ReadWriteMany): hub weights and compile artifacts survive restarts."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(options.cache_claim),
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": options.cache_size}}},
    }


def metrics_service() -> dict[str, Any]:
    """Headless, and listing pods that are not ready: metrics matter most when models are not."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(f"{NAME}-metrics"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": dict(APP_LABELS),
            "ports": [{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}],
        },
    }


def disruption_budget() -> dict[str, Any]:
    """Voluntary evictions (node drains) take one serving worker at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(f"{NAME}-workers"),
        "spec": {"maxUnavailable": 1, "unhealthyPodEvictionPolicy": "AlwaysAllow",
                 "selector": {"matchLabels": {**APP_LABELS, "ray.io/node-type": "worker"}}},
    }


def pod_monitor() -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _metadata(NAME),
        "spec": {
            "selector": {"matchLabels": dict(APP_LABELS)},
            "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
        },
    }


def shared_manifests(options: RenderOptions) -> list[dict[str, Any]]:
    return [cache_claim(options), metrics_service(), disruption_budget()]


def render(options: RenderOptions, config: dict[str, Any], *, with_pod_monitor: bool = False) -> list[dict[str, Any]]:
    """Every manifest, standalone: ``kubectl apply -f`` of their YAML serves the repository."""
    documents = [*shared_manifests(options), rayservice(options, config)]
    return [*documents, pod_monitor()] if with_pod_monitor else documents


class _ManifestDumper(yaml.SafeDumper):
    """Multi-line strings (``serveConfigV2``) as literal blocks, readable in a diff."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _represent_str)


def to_yaml(documents: list[dict[str, Any]], header: str) -> str:
    body = "---\n".join(yaml.dump(doc, Dumper=_ManifestDumper, sort_keys=False, width=120) for doc in documents)
    return f"# {header}\n{body}"


def kustomize_files(repository: Path, models_claim: str | None = None) -> dict[str, str]:
    """Generated files of the kustomize tree, by path relative to its root."""
    header = "Generated by `hybridserve deploy render --kustomize deploy`: do not edit; re-render instead."
    cpu = RenderOptions(repository=repository, models_claim=models_claim)
    gpu = RenderOptions(repository=repository, gpu=True, models_claim=models_claim)
    return {
        "base/hybridserve.yaml": to_yaml(shared_manifests(cpu), header),
        "overlays/cpu/rayservice.yaml": to_yaml([rayservice(cpu, cluster_serve_config(cpu))], header),
        "overlays/gpu/rayservice.yaml": to_yaml([rayservice(gpu, cluster_serve_config(gpu))], header),
        "components/monitoring/podmonitor.yaml": to_yaml([pod_monitor()], header),
    }


def cmd_deploy_render(args: argparse.Namespace) -> int:
    from hybridserve.server.repository import builtin_repository

    repository = Path(args.repository).resolve() if args.repository else builtin_repository()
    options = RenderOptions(repository=repository, gpu=args.gpu, image=args.image,
                            gpus_per_replica=args.gpus_per_replica, models_claim=args.models_claim)
    config = cluster_serve_config(options)
    for name in custom_resources(config):
        print(f"warning: models ask for the custom Ray resource {name!r}: add it to a worker group's "
              f"rayStartParams.resources, or their replicas never start", file=sys.stderr)
    if args.kustomize:
        if args.gpu or args.image or args.pod_monitor:
            print("error: --kustomize renders both overlays and the monitoring component; images are set in "
                  "the overlays' kustomization.yaml: drop --gpu, --image and --pod-monitor", file=sys.stderr)
            return 2
        root = Path(args.kustomize)
        for relative, text in kustomize_files(repository, args.models_claim).items():
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_text(text)
            print(f"wrote {root / relative}", file=sys.stderr)
        return 0
    documents = render(options, config, with_pod_monitor=args.pod_monitor)
    text = to_yaml(documents, "Generated by `hybridserve deploy render`.")
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def add_deploy_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``hybridserve deploy render`` on the CLI."""
    deploy_p = sub.add_parser("deploy", help="Kubernetes (KubeRay) manifests for a model repository")
    deploy_sub = deploy_p.add_subparsers(dest="deploy_command", required=True)
    render_p = deploy_sub.add_parser("render", help="render the RayService and its Services, PDB, PVC")
    render_p.add_argument("--repository", help="folder of *.yaml model specs (default: the built-in models)")
    render_p.add_argument("--image", help="container image (default: hybridserve:gpu when a model asks for a GPU, "
                                            "else hybridserve:cpu)")
    render_p.add_argument("--gpu", action="store_true",
                          help="serve every model on a GPU worker group (fractional GPUs per replica)")
    render_p.add_argument("--gpus-per-replica", type=float, default=DEFAULT_GPUS_PER_REPLICA,
                          help="GPU share of a replica whose spec does not set device.gpus (with --gpu)")
    render_p.add_argument("--models-claim", help=f"PersistentVolumeClaim holding the repository, mounted at "
                                                 f"{MODEL_ROOT} (default: the repository baked into the image)")
    render_p.add_argument("--pod-monitor", action="store_true", help="add a PodMonitor (prometheus-operator)")
    output = render_p.add_mutually_exclusive_group()
    output.add_argument("--out", help="write the manifests to this file (default: stdout)")
    output.add_argument("--kustomize", metavar="DIR", help="write the generated files of the kustomize tree in DIR")
    render_p.set_defaults(func=cmd_deploy_render)
