"""Serving across two Ray nodes: a replica pinned to the second node, then that node dies.

A local Ray cluster of two nodes runs as subprocesses on 127.0.0.1: a head and a worker
that offers the custom resource ``worker_node``, each ``ray start --block`` in its own process
group and temp dir (so the worker can be killed alone). ``hybridserve serve --address`` serves a
repository whose one model (the built-in PSNR metric, which needs no weights) asks for
``worker_node``. The test checks that the replica runs on the worker node and answers, kills
the worker node, and checks that the server says the model is not ready, and that requests get
an error answer instead of hanging. The test process never joins this cluster (the session's
own Ray instance may run in it); a short helper subprocess inspects it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import free_port

BIN = Path(sys.executable).parent
RESOURCE = "worker_node"
MODEL = "psnr"
STARTUP_S = 150  # Ray nodes and the server come up within this (the check is a deadline, not a timing)
DEATH_S = 60  # the server reports the dead node's model as not ready within this
REQUEST_TIMEOUT_S = 5  # X-Request-Timeout of inference requests after the node died

INSPECT = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
workers = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(sys.argv[2])]
replicas = {}
for actor in ray.util.list_named_actors(all_namespaces=True):
    if "SERVE_REPLICA" in actor["name"] and sys.argv[3] in actor["name"]:
        handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
        replicas[actor["name"]] = ray.get(handle.__ray_call__.remote(
            lambda self: ray.get_runtime_context().get_node_id()), timeout=30)
print(json.dumps({"worker_nodes": workers, "replica_nodes": replicas}))
"""


def _env() -> dict[str, str]:
    """The environment of this cluster's processes: none of the session Ray's settings (RAY_ADDRESS...)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update({
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        # The head notices a dead raylet after 3 missed 1 s health checks instead of 5 missed 3 s ones.
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    })
    return env


def _ray_node(temp_dir: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """One Ray node: ``ray start --block`` leads a process group that holds all of the node's processes."""
    ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"]
    command = [str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
               "--num-gpus", "0", "--object-store-memory", str(100 * 1024 * 1024), "--temp-dir", str(temp_dir),
               "--disable-usage-stats", *[part for flag in ports for part in (flag, str(free_port()))], *args]
    return subprocess.Popen(command, env={**_env(), **(env or {})}, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _kill_group(process: subprocess.Popen, grace_s: float) -> None:
    """Stop a process group we started: SIGTERM, then SIGKILL after ``grace_s``."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def _wait_for(predicate, deadline_s: float, what: str, processes: list[subprocess.Popen]):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise AssertionError(f"{process.args[:3]} exited with {process.returncode} while waiting for {what}")
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {deadline_s}s waiting for {what}")


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=10)
    except httpx.HTTPError:
        return None


def _png(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _pinned_repository(folder: Path) -> Path:
    """The built-in PSNR spec, placed on the node that offers ``worker_node``."""
    from hybridserve.server.repository import builtin_repository

    data = yaml.safe_load((builtin_repository() / f"{MODEL}.yaml").read_text())
    data["device"] = {"type": "cpu", "cpus": 1, "resources": {RESOURCE: 1}}
    folder.mkdir()
    (folder / f"{MODEL}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


def _logs(paths: list[Path]) -> str:
    return "\n".join(f"--- {p.name} (tail)\n" + p.read_text(errors="replace")[-3000:] for p in paths if p.exists())


def test_replica_on_second_node_and_node_loss(tmp_path):
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("the ray command is not installed next to this Python")
    # Ray's unix sockets need short paths: its temp dirs live under /tmp, removed below.
    head_dir = Path(tempfile.mkdtemp(prefix="hs-head-", dir="/tmp"))
    worker_dir = Path(tempfile.mkdtemp(prefix="hs-wrk-", dir="/tmp"))
    logs = [tmp_path / "head.log", tmp_path / "worker.log", tmp_path / "server.log"]
    gcs_port, http_port, grpc_port = free_port(), free_port(), free_port()
    address = f"127.0.0.1:{gcs_port}"
    url = f"http://127.0.0.1:{http_port}"
    processes: list[subprocess.Popen] = []
    try:
        head = _ray_node(head_dir, logs[0], "--head", "--port", str(gcs_port), "--include-dashboard", "false",
                         "--ray-client-server-port", str(free_port()))
        processes.append(head)
        _wait_for(lambda: (head_dir / "session_latest").exists(), STARTUP_S, "the head node", processes)
        # Serve runs a proxy on every node, on the same ports (SO_REUSEPORT): on one host the kernel
        # would spread the test's connections over both nodes' proxies, and one could land on the
        # worker's while it dies (a 500 from a proxy being killed, which separate machines never
        # share). The worker's proxy gets ports of its own, so the test speaks to the head's.
        worker_proxy = {"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(free_port()),
                        "RAY_SERVE_WORKER_PROXY_GRPC_PORT": str(free_port())}
        worker = _ray_node(worker_dir, logs[1], "--address", address, "--resources", json.dumps({RESOURCE: 1}),
                           env=worker_proxy)
        processes.append(worker)
        repository = _pinned_repository(tmp_path / "repository")
        server = subprocess.Popen(
            [str(BIN / "hybridserve"), "serve", "--address", address, "--host", "127.0.0.1",
             "--port", str(http_port), "--grpc-port", str(grpc_port), "--repository", str(repository)],
            env=_env(), stdout=logs[2].open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        processes.append(server)

        ready = _wait_for(lambda: (r := _get(f"{url}/readyz")) is not None and r.status_code == 200 and r,
                          STARTUP_S, "/readyz to answer 200", processes)
        assert ready.json()["models"] == {MODEL: "ready"}

        inspect = subprocess.run([sys.executable, "-c", INSPECT, address, RESOURCE, f"model-{MODEL}"],
                                 env=_env(), capture_output=True, text=True, timeout=120)
        assert inspect.returncode == 0, inspect.stderr[-3000:]
        placement = json.loads(inspect.stdout.strip().splitlines()[-1])
        assert len(placement["worker_nodes"]) == 1, placement
        assert placement["replica_nodes"], f"no replica of model-{MODEL} found: {placement}"
        assert set(placement["replica_nodes"].values()) == set(placement["worker_nodes"]), placement

        rng = np.random.default_rng(0)
        reference = rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
        noisy = np.clip(reference.astype(int) + rng.integers(-8, 9, size=reference.shape), 0, 255).astype(np.uint8)
        body = {"image": _png(noisy), "reference": _png(reference)}
        answer = httpx.post(f"{url}/v1/models/{MODEL}/assess", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        mse = np.mean((noisy.astype(float) - reference.astype(float)) ** 2)
        assert answer.json()["score"] == pytest.approx(10 * np.log10(255.0 ** 2 / mse), abs=0.01)

        _kill_group(worker, grace_s=0)  # the whole second node dies at once, as a lost machine would
        gone = _wait_for(lambda: (r := _get(f"{url}/v1/models/{MODEL}")) is not None
                         and r.status_code == 200 and r.json()["status"] != "ready" and r,
                         DEATH_S, f"model {MODEL} to be reported not ready", [head, server])
        assert gone.json()["status"] in ("loading", "unavailable", "failed"), gone.json()
        readiness = httpx.get(f"{url}/readyz", timeout=30)
        assert readiness.status_code == 503 and readiness.json()["models"][MODEL] != "ready", readiness.text

        # No node offers the resource any more: a request gets an error answer within its deadline
        # (the client's own timeout is the bound; exceeding it fails the test), not a hang.
        refused = httpx.post(f"{url}/v1/models/{MODEL}/assess", json=body, timeout=REQUEST_TIMEOUT_S + 25,
                             headers={"X-Request-Timeout": str(REQUEST_TIMEOUT_S)})
        assert refused.status_code in (503, 504), refused.text
        assert refused.json()["error"]["code"] in ("model_not_ready", "deadline_exceeded"), refused.text
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_logs(logs)}") from None
    finally:
        for process in reversed(processes):
            _kill_group(process, grace_s=15)
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(worker_dir, ignore_errors=True)
