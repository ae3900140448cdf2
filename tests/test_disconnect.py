"""A client that disconnects has its queued work cancelled: in-process (uvicorn) and under Ray Serve.

In-process, the slow fixture model appends every batch's size to a file, so the test counts from
outside the server the items it really computed; under Ray Serve the server's own counters (batch
sizes and cancelled items in Ray's metrics export) tell the same.
"""

from __future__ import annotations

import asyncio
import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import LocalServer, write_spec
from tests.test_metrics import settled
from tests.test_reliability import FIXTURES, PNG, keep_output, metric, png, wait_until_idle

CONNECTED, DISCONNECTED = 4, 4  # requests that wait for their answer, and requests whose client leaves


@pytest.fixture(scope="module")
def tally(tmp_path_factory):
    """A server whose slow model computes one item per second, one at a time, and records each batch."""
    repo = tmp_path_factory.mktemp("disconnect")
    computed = repo / "computed.txt"
    write_spec(repo, "tally", task="classification", architecture=f"python:{FIXTURES / 'slow_model.py'}:SlowClassifier",
               architecture_args={"delay_s": 1.0, "count_file": str(computed)}, preprocessing={"input_size": [16, 16]},
               labels=["a", "b"], batching={"max_batch_size": 1, "max_wait_ms": 1, "max_queue": 16})
    server = LocalServer(repo).wait_live()
    server.output = keep_output(server)
    yield server, computed
    server.stop()


def items_computed(computed: Path) -> int:
    return sum(int(line) for line in computed.read_text().split()) if computed.exists() else 0


def open_and_leave(url: str, path: str, body: bytes, request_id: str) -> socket.socket:
    """Send a whole PNG request on a raw connection; closing the socket later is the client leaving."""
    address = httpx.URL(url)
    connection = socket.create_connection((address.host, address.port))
    head = (f"POST {path} HTTP/1.1\r\nHost: {address.host}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-ID: {request_id}\r\n\r\n")
    connection.sendall(head.encode() + body)
    return connection


def test_disconnected_clients_queued_items_are_never_computed(tally):
    server, computed = tally
    image = png()
    wait_until_idle(server, "tally")
    computed_before = items_computed(computed)
    cancelled_before = metric(server, "hybridserve_cancelled_items_total", model="tally")
    gone_before = metric(server, "hybridserve_requests_total", model="tally", outcome="cancelled")

    async def scenario() -> tuple[list[int], int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            connected = [asyncio.create_task(client.post("/v1/models/tally/classify", content=image, headers=PNG))
                         for _ in range(CONNECTED)]

            async def admitted(count: int) -> None:  # answered requests have left the queue gauge
                deadline = time.monotonic() + 30
                while (await asyncio.to_thread(metric, server, "hybridserve_queued_items", model="tally")
                       + sum(task.done() for task in connected)) < count:
                    assert time.monotonic() < deadline, f"fewer than {count} requests admitted after 30 s"
                    await asyncio.sleep(0.02)

            await admitted(CONNECTED)  # the connected requests queue first
            leaving = [open_and_leave(server.url, "/v1/models/tally/classify", image, f"leaves-{i}")
                       for i in range(DISCONNECTED)]
            await admitted(CONNECTED + DISCONNECTED)
            computed_at_close = items_computed(computed) - computed_before
            for connection in leaving:
                connection.close()
            return [response.status_code for response in await asyncio.gather(*connected)], computed_at_close

    statuses, computed_at_close = asyncio.run(scenario())
    # One item at a time, first come first served: with at most CONNECTED - 2 items done when the clients
    # left, at most CONNECTED - 1 had started, so a connected item was still ahead of every leaving one.
    assert computed_at_close <= CONNECTED - 2, "the test was too slow to leave while queued"
    assert statuses == [200] * CONNECTED
    wait_until_idle(server, "tally")
    assert items_computed(computed) - computed_before == CONNECTED  # the model never ran the leavers' items
    assert metric(server, "hybridserve_cancelled_items_total", model="tally") - cancelled_before == DISCONNECTED
    assert metric(server, "hybridserve_requests_total", model="tally", outcome="cancelled") - gone_before \
        == DISCONNECTED
    assert metric(server, "hybridserve_requests_in_flight", model="tally") == 0
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.get("/readyz").status_code == 200
        assert client.post("/v1/models/tally/classify", content=image, headers=PNG).status_code == 200
    log = "".join(server.output)
    for i in range(DISCONNECTED):  # the request log marks each 499 (client closed request), under its id
        assert any(f"[leaves-{i}]" in line and "status=499" in line for line in server.output), log[-3000:]
    assert " ERROR " not in log and "Traceback" not in log and "status=500" not in log, log[-3000:]


@pytest.mark.parametrize("api,path,content_type", [
    ("http", "/v1/models/tally/classify", "image/png"),
    ("oip", "/v2/models/tally/infer", "application/json"),
])
def test_a_client_that_leaves_while_uploading_is_recorded_as_499_not_an_error(tally, api, path, content_type):
    server, _ = tally
    gone_before = metric(server, "hybridserve_requests_total", api=api, model="tally", outcome="cancelled")
    address = httpx.URL(server.url)
    with socket.create_connection((address.host, address.port)) as connection:
        connection.sendall((f"POST {path} HTTP/1.1\r\nHost: {address.host}\r\nContent-Type: {content_type}\r\n"
                            f"Content-Length: 100000\r\nX-Request-ID: upload-{api}\r\n\r\n").encode() + b"{" * 100)
        time.sleep(0.5)  # the server is reading the body when the client goes
    deadline = time.monotonic() + 30
    while metric(server, "hybridserve_requests_total", api=api, model="tally", outcome="cancelled") == gone_before:
        assert time.monotonic() < deadline, "the abandoned upload was never recorded"
        time.sleep(0.1)
    assert metric(server, "hybridserve_requests_in_flight", api=api, model="tally") == 0
    assert not [line for line in server.output if f"[upload-{api}]" in line and "status=500" in line]


# ------------------------------------------------------------------ under Ray Serve (the session's server)


def photo(side: int) -> bytes:
    """A smooth image of ``side`` x ``side`` pixels."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    array = np.stack([np.add.outer(ramp, ramp) / 2, np.outer(ramp, np.ones(side)), np.add.outer(ramp, -ramp) % 256],
                     axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_under_ray_a_disconnected_request_is_cancelled_in_its_model_replica(server):
    """Ray Serve cancels the request when its client leaves; the replica drops the queued item."""
    server.need("craft-x4")
    model, slow, small = "craft-x4", photo(192), photo(48)  # one tile each; the first takes seconds

    def post(image: bytes) -> httpx.Response:
        return httpx.post(f"{server.http_url}/v1/models/{model}/restore", content=image, headers=PNG, timeout=300)

    started = time.perf_counter()
    assert post(slow).status_code == 200
    slow_s = time.perf_counter() - started  # the timings below scale with this machine's speed
    before = settled(server.metrics_url)
    with ThreadPoolExecutor(1) as pool:
        computing = pool.submit(post, slow)
        time.sleep(slow_s / 4)  # the slow request is computing: the next one queues behind it
        leaving = open_and_leave(server.http_url, f"/v1/models/{model}/restore", small, "leaves-ray")
        time.sleep(slow_s / 4)
        leaving.close()
        assert computing.result().status_code == 200
    after = settled(server.metrics_url)

    def delta(name: str, **labels: str) -> float:
        return after.total(name, model=model, **labels) - before.total(name, model=model, **labels)

    batches = delta("hybridserve_batch_size_count")
    single = sum(delta("hybridserve_batch_size_bucket", le=le) for le in ("1", "1.0"))  # as Ray spells it
    cancelled_items = delta("hybridserve_cancelled_items_total")
    left, answered = (delta("hybridserve_requests_total", outcome=outcome) for outcome in ("cancelled", "ok"))
    seen = f"{batches=} {single=} {cancelled_items=} {left=} {answered=}"
    # One batch of one item ran, the slow request's (Ray's export rebuilds a histogram's _sum from buckets),
    # the leaver's item was dropped in the model replica, and the gateway counted a 499.
    assert batches == single == 1 and cancelled_items == 1 and left == 1 and answered == 1, seen
    assert post(small).status_code == 200


# ------------------------------------------------------------------ gRPC: the servicer, in this process


def test_a_cancelled_grpc_call_is_recorded_as_499_and_leaves_nothing_in_flight(tmp_path):
    """A gRPC client that cancels (or whose deadline passes) cancels the servicer's coroutine."""
    from prometheus_client.parser import text_string_to_metric_families

    from hybridserve.server.observability import metrics, runtime_metrics
    from hybridserve.server.transports.grpc_services import TaskServicerMixin, v1
    from hybridserve.server.engine.local import local_plane
    from hybridserve.server.repository import load_spec
    from hybridserve.server.core.settings import Settings

    spec = load_spec(write_spec(tmp_path, "grpc-slow", task="classification",
                                architecture=f"python:{FIXTURES / 'slow_model.py'}:SlowClassifier",
                                architecture_args={"delay_s": 2.0}, preprocessing={"input_size": [16, 16]},
                                labels=["a", "b"]))
    servicer = TaskServicerMixin()
    servicer.init_services(local_plane([spec], observer=runtime_metrics), Settings())

    def sample(name: str, **labels: str) -> float:
        text = metrics.backend().exposition()[0].decode()
        return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    async def scenario() -> None:
        call = asyncio.create_task(servicer.Classify(v1.ClassifyRequest(model="grpc-slow", image=png()), None))
        deadline = time.monotonic() + 30
        while sample("hybridserve_queued_items", model="grpc-slow") == 0:  # queued behind nothing: computing
            assert time.monotonic() < deadline and not call.done()
            await asyncio.sleep(0.02)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(scenario())
    assert sample("hybridserve_requests_total", api="grpc", model="grpc-slow", outcome="cancelled") == 1
    assert sample("hybridserve_requests_in_flight", api="grpc", model="grpc-slow") == 0
