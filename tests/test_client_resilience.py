"""Client retries, timeouts, error mapping, headers and authentication, without Ray.

Most tests use a small scripted server, a real Starlette app under uvicorn on 127.0.0.1: each
model name scripts one behaviour (503 then 200, 429, 400, 500, a slow answer, ...), and every
request is recorded so the tests can count attempts and read the headers the client sent.
The authentication test runs hybridserve's own HTTP app in process (the PSNR model, no Ray)
with API keys configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import pytest
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hybridserve_client import (
    AsyncClient,
    Client,
    ClassificationResult,
    ConnectionFailed,
    HybridServeError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    ServerError,
    Timeout,
    Unauthenticated,
    Unavailable,
)
from tests.conftest import free_port

OK_BODY = {"predictions": [{"label": "cat", "index": 0, "score": 0.9}]}


def error(status: int, code: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    return JSONResponse({"error": {"code": code, "message": f"scripted {code}"}}, status_code=status, headers=headers)


class ScriptedServer:
    """Answers POST /v1/models/{name}/classify as the name (up to a '-') says; records (time, headers) of hits."""

    def __init__(self) -> None:
        self.hits: dict[str, list[tuple[float, dict[str, str]]]] = defaultdict(list)
        self.app = Starlette(routes=[Route("/v1/models/{name}/classify", self.classify, methods=["POST"])])

    async def classify(self, request: Request) -> Response:
        name = request.path_params["name"]
        await request.body()
        self.hits[name].append((time.monotonic(), dict(request.headers)))
        attempt, behaviour = len(self.hits[name]), name.split("-")[0]
        if behaviour == "flaky" and attempt <= 2:
            return error(503, "overloaded", retry_after=1)
        if behaviour == "throttled" and attempt == 1:
            return JSONResponse({"detail": "slow down"}, status_code=429)
        if behaviour == "slow":
            await asyncio.sleep(1.5)
        scripted = {
            "busy": lambda: error(503, "overloaded", retry_after=1),
            "loading": lambda: error(503, "model_not_ready"),
            "bad": lambda: error(400, "invalid_input"),
            "broken": lambda: error(500, "internal"),
            "locked": lambda: error(401, "unauthenticated"),
            "gateway": lambda: Response("<html>bad gateway</html>", status_code=502, media_type="text/html"),
        }.get(behaviour)
        if scripted:
            return scripted()
        return JSONResponse({"model": name, **OK_BODY}, headers={"X-Request-ID": request.headers["x-request-id"]})


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """Run an ASGI app under uvicorn in a thread on 127.0.0.1; yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                          timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def scripted():
    fake = ScriptedServer()
    with serving(fake.app) as url:
        fake.url = url
        yield fake


@pytest.fixture(scope="module")
def image() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_503_is_retried_after_retry_after_then_succeeds(scripted, image):
    with Client(scripted.url, retries=3, backoff=0.01) as client:
        result = client.classify("flaky", image)
    assert isinstance(result, ClassificationResult) and result.top1.label == "cat"
    hits = scripted.hits["flaky"]
    assert len(hits) == 3
    gaps = [later[0] - earlier[0] for earlier, later in zip(hits, hits[1:], strict=False)]
    assert min(gaps) >= 0.95, f"Retry-After: 1 was not respected: gaps {gaps}"
    assert len({headers["x-request-id"] for _, headers in hits}) == 1, "one request id across its retries"


def test_429_is_retried(scripted, image):
    with Client(scripted.url, retries=2, backoff=0.01) as client:
        assert client.classify("throttled", image).top1.label == "cat"
    assert len(scripted.hits["throttled"]) == 2


@pytest.mark.parametrize(
    ("name", "exception", "attempts"),
    [
        ("bad", InvalidInput, 1),
        ("locked", Unauthenticated, 1),
        ("broken", ServerError, 1),
        ("gateway", ServerError, 1),
        ("loading", ModelNotReady, 3),
        ("busy", Overloaded, 3),
    ],
)
def test_errors_map_and_only_unavailable_is_retried(scripted, image, name, exception, attempts):
    with Client(scripted.url, retries=2, backoff=0.01) as client:
        with pytest.raises(exception) as caught:
            client.classify(name, image)
    assert type(caught.value) is exception
    assert len(scripted.hits[name]) == attempts
    assert caught.value.status in (400, 401, 500, 502, 503)
    assert caught.value.request_id == scripted.hits[name][0][1]["x-request-id"]
    if name == "busy":
        assert caught.value.retry_after == 1 and caught.value.code == "overloaded"


def test_unknown_route_is_model_not_found(scripted, image):
    with Client(scripted.url, retries=2) as client, pytest.raises(ModelNotFound) as caught:
        client.detect("anything", image)
    assert caught.value.status == 404


def test_client_timeout_raises_timeout_without_retrying(scripted, image):
    with Client(scripted.url, timeout=0.2, retries=2, backoff=0.01) as client, pytest.raises(Timeout):
        client.classify("slow", image)
    hits = scripted.hits["slow"]
    assert len(hits) == 1
    assert hits[0][1]["x-request-timeout"] == "0.2", "the server is told the same deadline"


def test_a_per_call_timeout_overrides_the_clients(scripted, image):
    with Client(scripted.url, timeout=30, retries=0) as client:
        client.classify("deadline-default", image)
        client.classify("deadline-call", image, timeout=5)
        client.classify("deadline-none", image, timeout=None)
        with pytest.raises(Timeout):
            client.classify("slow-call", image, timeout=0.2)
        for bad in (0, -1, "5", True):
            with pytest.raises(ValueError, match="positive number of seconds or None"):
                client.classify("deadline-bad", image, timeout=bad)
    sent = {name: scripted.hits[name][0][1] for name in ("deadline-default", "deadline-call", "deadline-none",
                                                         "slow-call")}
    assert sent["deadline-default"]["x-request-timeout"] == "30"
    assert sent["deadline-call"]["x-request-timeout"] == "5"
    assert "x-request-timeout" not in sent["deadline-none"]
    assert sent["slow-call"]["x-request-timeout"] == "0.2"
    assert sent["deadline-default"]["accept"] == "application/json"
    assert "deadline-bad" not in scripted.hits, "a bad timeout is refused before anything is sent"


async def test_async_per_call_timeout(scripted, image):
    async with AsyncClient(scripted.url, timeout=0.2, retries=0) as client:
        assert (await client.classify("slow-patient", image, timeout=5)).top1.label == "cat"
        with pytest.raises(Timeout):
            await client.classify("slow-impatient", image)
    assert scripted.hits["slow-patient"][0][1]["x-request-timeout"] == "5"


def test_credentials_and_request_id_are_sent(scripted, image):
    with Client(scripted.url, api_key="k-123", token="t-456") as client:
        client.classify("auth-check", image)
    headers = scripted.hits["auth-check"][0][1]
    assert headers["x-api-key"] == "k-123"
    assert headers["authorization"] == "Bearer t-456"
    assert headers["content-type"] == "image/png"
    assert len(headers["x-request-id"]) == 32


def test_connection_refused_is_retried_then_connection_failed():
    with Client(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.01) as client:
        assert client.live() is False and client.ready() is False
        with pytest.raises(ConnectionFailed) as caught:
            client.classify("classifier", b"\x89PNG\r\n\x1a\n")
    assert caught.value.retryable and caught.value.request_id


def cutting_server(cuts: int) -> tuple[socket.socket, list[int]]:
    """A raw HTTP server whose first ``cuts`` answers stop mid-body (a gateway killed as it wrote), then whole ones."""
    listener = socket.create_server(("127.0.0.1", 0))
    answered: list[int] = []
    whole = json.dumps({"model": "classifier", **OK_BODY}).encode()

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += connection.recv(65536)
                head, body = request.split(b"\r\n\r\n", 1)
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                while len(body) < length:
                    body += connection.recv(65536)
                answered.append(len(body))
                cut = len(answered) <= cuts
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                                   b"Content-Length: %d\r\n\r\n%s" % (len(whole), whole[:10] if cut else whole))

    threading.Thread(target=serve, daemon=True).start()
    return listener, answered


def test_an_answer_cut_mid_body_is_retried(image):
    listener, answered = cutting_server(cuts=2)
    with listener, Client(f"http://127.0.0.1:{listener.getsockname()[1]}", retries=3, backoff=0.01) as client:
        assert client.classify("classifier", image).top1.label == "cat"
    assert len(answered) == 3 and set(answered) == {answered[0]}, "each retry sends the whole request again"
    listener, answered = cutting_server(cuts=5)
    with listener, Client(f"http://127.0.0.1:{listener.getsockname()[1]}", retries=1, backoff=0.01) as client:
        with pytest.raises(ConnectionFailed) as caught:
            client.classify("classifier", image)
    assert caught.value.retryable and len(answered) == 2


def test_unreachable_grpc_server_is_unavailable():
    with Client(f"grpc://127.0.0.1:{free_port()}", retries=1, backoff=0.01, timeout=5) as client:
        assert client.live() is False
        with pytest.raises(Unavailable) as caught:
            client.classify("classifier", b"\x89PNG\r\n\x1a\n")
    assert caught.value.retryable and caught.value.status is None


def test_a_failing_image_fails_the_batch(scripted, image):
    with Client(scripted.url, retries=0, max_in_flight=2) as client, pytest.raises(InvalidInput):
        client.classify("bad-batch", [image] * 5)


async def test_async_client_retries_and_maps_errors(scripted, image):
    async with AsyncClient(scripted.url, retries=2, backoff=0.01) as client:
        assert (await client.classify("throttled-async", image)).top1.label == "cat"
        with pytest.raises(ModelNotReady):
            await client.classify("loading-async", image)
        with pytest.raises(HybridServeError) as caught:
            await client.classify("bad-async", image)
    async with AsyncClient(scripted.url, timeout=0.2) as impatient:
        with pytest.raises(Timeout):
            await impatient.classify("slow-async", image)
    assert type(caught.value) is InvalidInput and caught.value.code == "invalid_input"
    assert len(scripted.hits["loading-async"]) == 3
    assert len(scripted.hits["bad-async"]) == 1
    assert len(scripted.hits["throttled-async"]) == 2


def test_api_key_and_bearer_token_against_hybridserve_with_keys(monkeypatch):
    import torch

    from hybridserve.server.core.settings import Settings
    from hybridserve.server.transports.http_api import create_http_app
    from hybridserve.server.engine.local import local_plane
    from hybridserve.server.repository import builtin_repository, load_spec

    torch.set_num_threads(1)
    monkeypatch.setenv("HYBRIDSERVE_API_KEYS", "key-one,key-two")
    app = create_http_app(local_plane([load_spec(builtin_repository() / "psnr.yaml")]), Settings.from_env())
    picture = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    with serving(app) as url:
        with Client(url, retries=2) as anonymous:
            assert anonymous.ready(), "health stays open"
            with pytest.raises(Unauthenticated) as caught:
                anonymous.assess("psnr", picture, reference=picture)
        with Client(url, api_key="wrong") as wrong, pytest.raises(Unauthenticated):
            wrong.models()
        with Client(url, api_key="key-one") as keyed, Client(url, token="key-two") as bearer:
            assert keyed.assess("psnr", picture, reference=picture).score == pytest.approx(100.0)
            assert [m.name for m in bearer.models()] == ["psnr"]
    assert (caught.value.status, caught.value.code) == (401, "unauthenticated")
