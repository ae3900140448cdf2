"""``hybridserve serve`` on Ray in a subprocess, on free ports, with the processes it started tracked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def children(pid: int) -> dict[int, int]:
    """Every descendant of ``pid``: {pid: start time (clock ticks), so a recycled pid is not mistaken}."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
            starts[int(entry.name)] = int(fields[19])
    found, todo = {}, [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found[child] = starts[child]
            todo.append(child)
    return found


def still_running(processes: dict[int, int]) -> list[str]:
    """The processes of ``processes`` that still run (the same process: same start time), by command line."""
    alive = []
    for pid, start in processes.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[19]) == start and fields[0] != "Z":
            alive.append(f"{pid}: {command[:120]}")
    return alive


def haproxy_pids(processes: dict[int, int]) -> list[int]:
    return [pid for pid in processes if "haproxy" in _command(pid).split(" ")[0]]


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class RayServer:
    """``hybridserve serve`` (Ray, HAProxy ingress where installed) on free loopback ports."""

    def __init__(self, repository: Path, *, port: int | None = None, grpc_port: int | None = None,
                 env: dict[str, str] | None = None, args: tuple[str, ...] = ()):
        self.port = port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.metrics_port = free_port()
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hybridserve.server.cli.main", "serve", "--host", "127.0.0.1",
             "--port", str(self.port), "--grpc-port", str(self.grpc_port), "--repository", str(repository),
             "--metrics-export-port", str(self.metrics_port), *args],
            # HAProxy's stats and metrics ports too: servers starting at once would all find 8404 free.
            env={**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
                 **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip())

    @property
    def output(self) -> str:
        return "\n".join(self.lines[-60:])

    def wait_ready(self, timeout: float = 300) -> RayServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited ({self.process.returncode}):\n{self.output}")
            if not any("hybridserve is serving" in line for line in self.lines):
                time.sleep(0.5)  # its banner: a port still held by a killed server's proxy says nothing of this one
                continue
            try:
                if httpx.get(f"{self.url}/readyz", timeout=3).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.output}")

    def processes(self) -> dict[int, int]:
        return children(self.process.pid)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL of the server and of whatever it started, if still there."""
        if self.process.poll() is None:
            started = self.processes()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            for line in still_running(started):
                try:
                    os.kill(int(line.split(":")[0]), signal.SIGKILL)
                except ProcessLookupError:
                    pass
