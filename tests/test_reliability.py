"""Overload, deadlines, broken models and authentication, on a real server over loopback."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import PSNR_SPEC, LocalServer, write_spec

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def png(size=(32, 32), seed=0) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    repo = tmp_path_factory.mktemp("reliability")
    write_spec(repo, "slow", task="classification", architecture=f"python:{FIXTURES / 'slow_model.py'}:SlowClassifier",
               architecture_args={"delay_s": 0.2}, preprocessing={"input_size": [16, 16]}, labels=["a", "b"],
               batching={"max_batch_size": 2, "max_wait_ms": 1, "max_queue": 4})
    write_spec(repo, "psnr", **PSNR_SPEC)
    write_spec(repo, "broken", task="classification", architecture="timm:convnext_atto",
               weights="missing.safetensors", preprocessing={"input_size": [32, 32]})
    server = LocalServer(repo).wait_live()
    yield server
    server.stop()


def test_a_broken_model_reports_why_and_the_others_serve(local):
    with httpx.Client(base_url=local.url, timeout=60) as client:
        info = client.get("/v1/models/broken").json()
        assert info["status"] == "failed" and "missing.safetensors" in info["reason"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["models"]["broken"] == "failed"
        response = client.post("/v1/models/broken/classify", content=png(), headers={"Content-Type": "image/png"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_not_ready"
        image = png()
        ok = client.post("/v1/models/psnr/assess", files={"image": image, "reference": image})
        assert ok.status_code == 200 and ok.json()["score"] == 100.0


def test_flood_is_answered_with_success_or_503_never_a_growing_queue(local):
    image = png()

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=local.url, timeout=60) as client:
            return await asyncio.gather(*(
                client.post("/v1/models/slow/classify", content=image, headers={"Content-Type": "image/png"})
                for _ in range(40)
            ))

    before = rss_mb(local.process.pid)
    started = time.monotonic()
    responses = asyncio.run(flood())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    refused = [r for r in responses if r.status_code == 503]
    assert refused and statuses.count(200) >= 4
    assert all(r.json()["error"]["code"] == "overloaded" and int(r.headers["Retry-After"]) >= 1 for r in refused)
    # A bounded queue: 40 requests at 0.2 s per batch of 2 would take 4 s if all were queued.
    assert time.monotonic() - started < 30
    time.sleep(1)
    assert rss_mb(local.process.pid) - before < 200


def test_deadline_expires_with_504(local):
    with httpx.Client(base_url=local.url, timeout=60) as client:
        response = client.post("/v1/models/slow/classify", content=png(), headers={
            "Content-Type": "image/png", "X-Request-Timeout": "0.05"})
        assert response.status_code == 504 and response.json()["error"]["code"] == "deadline_exceeded"
        bad = client.post("/v1/models/slow/classify", content=png(), headers={
            "Content-Type": "image/png", "X-Request-Timeout": "soon"})
        assert bad.status_code == 400


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    repo = tmp_path_factory.mktemp("secured")
    write_spec(repo, "psnr", **PSNR_SPEC)
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("file-key\n")
    server = LocalServer(repo, env={"HYBRIDSERVE_API_KEYS": "k1,k2", "HYBRIDSERVE_API_KEYS_FILE": str(keys),
                                    "HYBRIDSERVE_CORS_ORIGINS": "https://app.example"}).wait_live()
    yield server
    server.stop()


def test_authentication(secured):
    image = png()
    files = {"image": image, "reference": image}
    with httpx.Client(base_url=secured.url, timeout=60) as client:
        assert client.get("/healthz").status_code == 200  # open by default
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
            refused = client.post("/v1/models/psnr/assess", files=files, headers=headers)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthenticated"
        unknown = client.post("/v1/models/does-not-exist/assess", files=files)
        assert unknown.status_code == 401  # no hint whether the model exists
        assert client.get("/v1/models").status_code == 401
        for headers in ({"X-API-Key": "k2"}, {"Authorization": "Bearer k1"}, {"X-API-Key": "file-key"}):
            assert client.post("/v1/models/psnr/assess", files=files, headers=headers).status_code == 200


def test_cors_only_for_configured_origins(secured, local):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with httpx.Client(timeout=30) as client:
        allowed = client.options(f"{secured.url}/v1/models/psnr/assess", headers=preflight)
        assert allowed.headers.get("access-control-allow-origin") == "https://app.example"
        other = client.options(f"{secured.url}/v1/models/psnr/assess",
                               headers={**preflight, "Origin": "https://evil.example"})
        assert other.headers.get("access-control-allow-origin") is None
        off = client.get(f"{local.url}/healthz", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in off.headers
