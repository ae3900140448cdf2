"""Closed-loop HTTP load generator on aiohttp, and CPU accounting of the processes under test.

``concurrency`` clients each send a request, wait for its answer, and send the next. The
measuring window opens once every client has had one answer (a queue as deep as the
concurrency is then in steady state) and lasts ``seconds``; throughput and latencies are those
of the answers that arrive inside it. Requests still in flight at the end are waited for, so
the next measurement starts on an idle server. The generator reports its own CPU time so a
table can show it was not the bottleneck, and the server's: the CPU seconds (psutil) of every
process of the server (its process tree and session: Ray's workers, raylet and GCS, HAProxy)
from the window's start to its end, which divided by the answers gives CPU-ms per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from dataclasses import dataclass

import aiohttp
import psutil


@dataclass
class Target:
    """Where and what to send."""

    url: str
    body: bytes
    headers: dict[str, str]


@dataclass
class LoadResult:
    concurrency: int
    completed: int
    errors: int
    seconds: float
    latencies_s: list[float]
    client_cpu_s: float
    server_cpu_s: float | None = None

    @property
    def throughput(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float | None:
        if not self.latencies_s:
            return None
        ordered = sorted(self.latencies_s)
        return 1000.0 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def p50_ms(self) -> float | None:
        return None if not self.latencies_s else 1000.0 * statistics.median(self.latencies_s)

    @property
    def p99_ms(self) -> float | None:
        return self.percentile_ms(0.99)

    @property
    def client_cpu_share(self) -> float:
        return self.client_cpu_s / self.seconds if self.seconds else 0.0


def _cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds of ``process``, with those of its children it has reaped."""
    times = process.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def busiest_now(seconds: float = 2.0, top: int = 5) -> list[str]:
    """The processes that used the most CPU over the next ``seconds``, as 'share% command'."""
    processes = list(psutil.process_iter())
    before = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            before[process.pid] = process.cpu_times()
    time.sleep(seconds)
    used = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            now, then = process.cpu_times(), before[process.pid]
            used.append((now.user + now.system - then.user - then.system, process))
    lines = []
    for share, process in sorted(used, key=lambda pair: pair[0], reverse=True)[:top]:
        if share < 0.01 * seconds:
            break
        try:
            command = " ".join(process.cmdline()).strip()
        except psutil.Error:
            command = ""
        lines.append(f"{100 * share / seconds:5.0f}%  {command[:110] or f'[pid {process.pid}]'}")
    return lines


def server_processes(root: int) -> list[psutil.Process]:
    """Every process of the server started as ``root``: its process tree, and whatever else runs in its
    session (the benchmark starts each server in a session of its own; Ray's raylet, GCS, workers
    and HAProxy are all in it)."""
    found: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.Error):
        top = psutil.Process(root)
        found = {p.pid: p for p in [top, *top.children(recursive=True)]}
    for process in psutil.process_iter():
        with contextlib.suppress(OSError):
            if os.getsid(process.pid) == root:
                found.setdefault(process.pid, process)
    return list(found.values())


def server_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by every process of the server ``root`` (user + system)."""
    total = 0.0
    for process in server_processes(root):
        with contextlib.suppress(psutil.Error):
            total += _cpu_seconds(process)
    return total


async def closed_loop(target: Target, concurrency: int, seconds: float, server_pid: int | None = None,
                      warmup_limit_s: float = 300.0) -> LoadResult:
    """Run ``concurrency`` clients; measure ``seconds`` once all have had an answer."""
    answered: set[int] = set()
    steady = asyncio.Event()
    window: dict[str, float] = {}
    latencies: list[float] = []
    counts = {"completed": 0, "errors": 0}
    stop = asyncio.Event()

    async def client(index: int, session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                async with session.post(target.url, data=target.body, headers=target.headers) as response:
                    await response.read()
                    ok = response.status == 200
            except aiohttp.ClientError:
                ok = False
            finished = time.perf_counter()
            if not steady.is_set():
                answered.add(index)
                if len(answered) == concurrency:
                    steady.set()
                continue
            if window["start"] <= finished <= window.get("end", float("inf")):
                if ok:
                    counts["completed"] += 1
                    latencies.append(finished - started)
                else:
                    counts["errors"] += 1

    timeout = aiohttp.ClientTimeout(total=warmup_limit_s + seconds + 600)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        tasks = [asyncio.create_task(client(i, session)) for i in range(concurrency)]
        try:
            await asyncio.wait_for(steady.wait(), warmup_limit_s)
        except TimeoutError:
            stop.set()
            for task in tasks:
                task.cancel()
            raise RuntimeError(f"{target.url}: {concurrency} clients had no answer within {warmup_limit_s:.0f}s")
        window["start"] = time.perf_counter()
        cpu_start = time.process_time()
        server_start = server_cpu_seconds(server_pid) if server_pid else None
        await asyncio.sleep(seconds)
        window["end"] = time.perf_counter()
        client_cpu = time.process_time() - cpu_start
        server_cpu = server_cpu_seconds(server_pid) - server_start if server_pid else None
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return LoadResult(concurrency, counts["completed"], counts["errors"], window["end"] - window["start"],
                      latencies, client_cpu, server_cpu)
