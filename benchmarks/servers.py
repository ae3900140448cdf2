"""Server processes under test: how each is started, when it is ready, where requests go.

Every server runs in its own session and process group, started here and stopped here (SIGTERM
to the server, then SIGKILL of its group only). hybridserve runs as its users start it: the
default ``hybridserve serve`` (Ray), ``--layout combined`` and ``--no-ray``. The plain Ray Serve
app (``benchmarks/plain_ray.py``) is the engine's floor. Every server runs as many torch threads
as the spec's ``device.cpus`` (``OMP_NUM_THREADS`` too).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.loadgen import Target, server_processes
from benchmarks.workloads import ROOT, Workload
from hybridserve.server.engine.cores import LOCKS_ENV

BENTOML_TOOLS = ROOT / ".venv" / "bench-tools" / "bentoml"
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
# Row labels the report's targets read.
PLAIN_RAY = "plain Ray Serve, @serve.batch (eager)"
FASTAPI = "FastAPI + uvicorn (eager)"
LITSERVE = "LitServe batched (eager)"


_RESERVED: dict[int, socket.socket] = {}


def free_port() -> int:
    """A free port, held (bound on every address, not listening) until the server named with it
    starts: Ray's processes, started in between, bind ports of the OS's choosing and would
    otherwise take it (a server then failed with "address already in use")."""
    sock = socket.socket()
    sock.bind(("", 0))
    port = sock.getsockname()[1]
    _RESERVED[port] = sock
    return port


def release_ports(command: list[str]) -> None:
    """Free the held ports a command names, just before it starts."""
    for word in command:
        if word.isdigit() and int(word) in _RESERVED:
            _RESERVED.pop(int(word)).close()


@dataclass
class ServerProcess:
    """One started server: its command, log file, readiness URL and process."""

    name: str
    command: list[str]
    ready_url: str
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    ray: bool = False  # starts a Ray cluster (these start one after another)
    process: subprocess.Popen | None = None
    ready_s: float | None = None

    def start(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **self.env}
        release_ports(self.command + [value for value in self.env.values() if value.isdigit()])
        handle = open(self.log, "w")
        self.process = subprocess.Popen(self.command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self._started = time.monotonic()

    def wait_ready(self, timeout_s: float) -> bool:
        deadline = self._started + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.ready_url, timeout=5) as response:
                    if response.status == 200:
                        self.ready_s = time.monotonic() - self._started
                        return True
            except (urllib.error.URLError, OSError, http.client.HTTPException):  # not (yet) our server
                pass
            time.sleep(1.0)
        return False

    def pause(self) -> None:
        """Stop every process of the server, so an idle server takes no CPU from the one being measured:
        its whole session (Ray's actors, the replicas, Serve's controller and proxies, HAProxy, each
        run in a process group of its own, stay in the server's session)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self._signal_session(sig)

    def _signal_session(self, sig: int) -> None:
        """``sig`` to every process of the server's session, each in whatever group it runs."""
        for process in server_processes(self.process.pid):
            try:
                os.kill(process.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.resume()  # a paused process cannot act on SIGTERM
        group = os.getpgid(self.process.pid)
        # The server itself first: hybridserve's Ray server then shuts Serve down (HAProxy included)
        # while Ray still runs; a SIGTERM to the whole group would kill Ray under it.
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(group, signal.SIGKILL)  # what the server left behind in its own group
        except ProcessLookupError:
            pass
        self._signal_session(signal.SIGKILL)  # and in its session, in groups of their own
        self.process.wait(timeout=30)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class System:
    """A row of the results table: a server (or none) and the request that reaches this model on it."""

    label: str
    server: str  # key into the started servers
    target: Target
    concurrencies: tuple[int, ...] | None = None  # None: every concurrency of the run


def hybridserve_target(base: str, workload: Workload, backend: str, batching: str = "") -> Target:
    return Target(f"{base}/v1/models/{workload.variant(backend, batching)}/{workload.verb}", workload.payload,
                  JSON_HEADERS)


def peer_target(base: str, workload: Workload, bentoml: bool = False) -> Target:
    body = workload.payload
    if bentoml:
        body = json.dumps({"images": [json.loads(body)["image"]]}).encode()
    return Target(f"{base}/predict", body, JSON_HEADERS)


def build_servers(workload: Workload, repositories: dict[str, Path], eager_spec: Path, logs: Path,
                  peers: list[str]) -> tuple[dict[str, ServerProcess], list[System]]:
    """The servers to start for one workload and the systems (rows) they serve."""
    python = sys.executable
    batching = workload.spec.get("batching", {})
    max_batch, wait_ms = str(batching.get("max_batch_size", 8)), str(batching.get("max_wait_ms", 5.0))
    compiled = workload.compiled_backend
    ports = {name: free_port() for name in ("ray", "ray-combined", "noray", "plain-ray", "fastapi", "litserve",
                                            "litserve-nobatch", "bentoml")}
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    threads = {"OMP_NUM_THREADS": str(workload.threads)}

    def hybridserve(name: str, repository: str, *extra: str) -> ServerProcess:
        command = [python, "-m", "hybridserve.server.cli.main", "serve", "--repository", str(repositories[repository]),
                   "--host", "127.0.0.1", "--port", str(ports[name]), "--grpc-port", str(free_port()), *extra]
        # Each its own core claims: one server runs at a time, and each pins as it would alone on the machine.
        return ServerProcess(name, command, url[name] + "/readyz", logs / f"{name}.log",
                             {**threads, LOCKS_ENV: str(logs / f"{name}-cores")}, ray="--no-ray" not in extra)

    peer = [python, "-m", "benchmarks.peers"]
    servers = {
        "ray": hybridserve("ray", "ray"),
        "ray-combined": hybridserve("ray-combined", "ray", "--layout", "combined"),
        "noray": hybridserve("noray", "noray", "--no-ray"),
        "plain-ray": ServerProcess("plain-ray", [python, "-m", "benchmarks.plain_ray", "--spec", str(eager_spec),
                                                 "--port", str(ports["plain-ray"]), "--grpc-port", str(free_port())],
                                   url["plain-ray"] + "/health", logs / "plain-ray.log", threads, ray=True),
        "fastapi": ServerProcess("fastapi", peer + ["fastapi", "--spec", str(eager_spec), "--port", str(ports["fastapi"])],
                                 url["fastapi"] + "/health", logs / "fastapi.log", threads),
        "litserve": ServerProcess("litserve", peer + ["litserve", "--spec", str(eager_spec), "--port",
                                  str(ports["litserve"]), "--max-batch", max_batch, "--wait-ms", wait_ms],
                                  url["litserve"] + "/health", logs / "litserve.log", threads),
        "litserve-nobatch": ServerProcess("litserve-nobatch", peer + ["litserve", "--spec", str(eager_spec), "--port",
                                          str(ports["litserve-nobatch"])], url["litserve-nobatch"] + "/health",
                                          logs / "litserve-nobatch.log", threads),
        "bentoml": ServerProcess(
            "bentoml", [python, str(BENTOML_TOOLS / "bin" / "bentoml"), "serve",
                        "benchmarks.bentoml_service:BenchService", "--host", "127.0.0.1", "--port", str(ports["bentoml"])],
            url["bentoml"] + "/readyz", logs / "bentoml.log",
            env={**threads, "PYTHONPATH": f"{BENTOML_TOOLS}{os.pathsep}{ROOT}", "BENCH_SPEC": str(eager_spec),
                 "BENCH_MAX_BATCH": max_batch,
                 "BENCH_MAX_LATENCY_MS": str(int(max(1000.0, workload.seconds_per_point * 1500)))}),
    }
    at_32 = (32,)
    systems = [
        System(f"hybridserve Ray ({compiled})", "ray", hybridserve_target(url["ray"], workload, compiled)),
        System("hybridserve Ray (eager)", "ray", hybridserve_target(url["ray"], workload, "eager")),
        System(f"hybridserve Ray combined ({compiled})", "ray-combined",
               hybridserve_target(url["ray-combined"], workload, compiled)),
        System("hybridserve Ray combined (eager)", "ray-combined",
               hybridserve_target(url["ray-combined"], workload, "eager")),
        System(f"hybridserve no-ray ({compiled})", "noray", hybridserve_target(url["noray"], workload, compiled)),
        System("hybridserve no-ray (eager)", "noray", hybridserve_target(url["noray"], workload, "eager")),
        System(f"hybridserve no-ray ({compiled}), batch 1", "noray",
               hybridserve_target(url["noray"], workload, compiled, "nobatch"), at_32),
        *([System(f"hybridserve Ray ({compiled}), adaptive, SLO {workload.latency_slo_ms:g} ms", "ray",
                  hybridserve_target(url["ray"], workload, compiled, "slo")),
           System(f"hybridserve no-ray ({compiled}), adaptive, SLO {workload.latency_slo_ms:g} ms", "noray",
                  hybridserve_target(url["noray"], workload, compiled, "slo"))] if workload.latency_slo_ms else []),
        System(PLAIN_RAY, "plain-ray", peer_target(url["plain-ray"], workload)),
        System(FASTAPI, "fastapi", peer_target(url["fastapi"], workload)),
        System(LITSERVE, "litserve", peer_target(url["litserve"], workload)),
        System("LitServe batch 1 (eager)", "litserve-nobatch", peer_target(url["litserve-nobatch"], workload), at_32),
        System("BentoML batched (eager)", "bentoml", peer_target(url["bentoml"], workload, bentoml=True)),
    ]
    if not workload.batching_gain:
        systems = [s for s in systems if s.concurrencies != at_32]
        peers = [p for p in peers if p != "litserve-nobatch"]
    wanted = {"ray", "ray-combined", "noray", *peers}
    if not BENTOML_TOOLS.is_dir():
        wanted.discard("bentoml")
    return ({k: v for k, v in servers.items() if k in wanted},
            [s for s in systems if s.server in wanted])
