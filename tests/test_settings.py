"""Settings are read once from the environment and every documented variable takes effect.

``Settings.from_env`` is checked variable by variable (and bad values fail with the variable's
name); then a real ``hybridserve serve --no-ray`` started with image limits, a body limit and a
default deadline applies them over HTTP and gRPC.
"""

from __future__ import annotations

import shutil

import grpc
import httpx
import numpy as np
import pytest

from hybridserve_client._grpc.hybridserve.v1 import hybridserve_pb2 as v1
from hybridserve_client._grpc.hybridserve.v1 import hybridserve_pb2_grpc as v1_grpc
from hybridserve.server.core.errors import ERROR_TABLE
from hybridserve.server.core.settings import DEFAULT_OPEN_PATHS, Settings
from hybridserve.server.repository import builtin_repository
from tests.conftest import LocalServer
from tests.test_http_api import png


def test_every_variable_is_read(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("from-file\n\n")
    settings = Settings.from_env({
        "HYBRIDSERVE_MAX_BODY_BYTES": "1234", "HYBRIDSERVE_REQUEST_TIMEOUT_S": "2.5",
        "HYBRIDSERVE_CORS_ORIGINS": "https://a.example, https://b.example", "HYBRIDSERVE_MAX_IMAGE_PIXELS": "999",
        "HYBRIDSERVE_MAX_IMAGE_SIDE": "77", "HYBRIDSERVE_API_KEYS": "k1,k2", "HYBRIDSERVE_API_KEYS_FILE": str(keys),
        "HYBRIDSERVE_OPEN_PATHS": "/healthz",
    })
    assert (settings.max_body_bytes, settings.request_timeout_s) == (1234, 2.5)
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert (settings.limits.max_pixels, settings.limits.max_side) == (999, 77)
    assert settings.api_keys == (b"k1", b"k2", b"from-file") and settings.open_paths == ("/healthz",)
    defaults = Settings.from_env({})
    assert defaults == Settings() and defaults.open_paths == DEFAULT_OPEN_PATHS and not defaults.api_keys


@pytest.mark.parametrize("name, value", [("HYBRIDSERVE_MAX_IMAGE_PIXELS", "lots"), ("HYBRIDSERVE_MAX_BODY_BYTES", "-1"),
                                         ("HYBRIDSERVE_REQUEST_TIMEOUT_S", "0")])
def test_bad_values_name_the_variable(name, value):
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: value})


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    repo = tmp_path_factory.mktemp("limits")
    for suffix in (".yaml", ".safetensors"):
        shutil.copy(builtin_repository() / f"classifier{suffix}", repo)
    server = LocalServer(repo, env={"HYBRIDSERVE_MAX_IMAGE_PIXELS": "5000", "HYBRIDSERVE_MAX_IMAGE_SIDE": "100",
                                    "HYBRIDSERVE_MAX_BODY_BYTES": "200000"}).wait_live(timeout=300)
    try:
        yield server
    finally:
        server.stop()


def image(height: int, width: int) -> bytes:
    return png(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size, fits", [((60, 80), True), ((80, 80), False), ((20, 120), False)])
def test_image_limits_apply_over_http_and_grpc(limited, size, fits):
    body = image(*size)
    answer = httpx.post(f"{limited.url}/v1/models/classifier/classify", content=body,
                        headers={"Content-Type": "image/png"}, timeout=30)
    with grpc.insecure_channel(limited.grpc_target) as channel:
        stub = v1_grpc.HybridServeStub(channel)
        if fits:
            assert answer.status_code == 200, answer.text
            assert stub.Classify(v1.ClassifyRequest(model="classifier", image=body), timeout=30).predictions
            return
        assert answer.status_code == 413 and "exceeds the limit of 5000 pixels" in answer.json()["error"]["message"]
        with pytest.raises(grpc.RpcError) as error:
            stub.Classify(v1.ClassifyRequest(model="classifier", image=body), timeout=30)
        assert error.value.code() == grpc.StatusCode[ERROR_TABLE["payload_too_large"].grpc_status] and "100 per side" in error.value.details()


def test_body_limit_applies_to_the_typed_and_oip_routes(limited):
    big = b"\x00" * 300_000
    typed = httpx.post(f"{limited.url}/v1/models/classifier/classify", content=big,
                       headers={"Content-Type": "image/png"}, timeout=30)
    oip = httpx.post(f"{limited.url}/v2/models/classifier/infer", content=big,
                     headers={"Content-Type": "application/json"}, timeout=30)
    assert typed.status_code == 413 and oip.status_code == 413
