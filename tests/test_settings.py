"""Settings are read once from the environment and every documented variable takes effect.

``Settings.from_env`` is checked variable by variable (and bad values fail with the variable's
name); then a real ``hybridserve serve --no-ray`` started with image limits, a body limit and a
default deadline applies them over HTTP and gRPC, typed and Open Inference Protocol, and the client
command reads its credentials from its own two variables.
"""

from __future__ import annotations

import shutil

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from hybridserve_client._grpc.hybridserve.v1 import hybridserve_pb2 as v1
from hybridserve_client._grpc.hybridserve.v1 import hybridserve_pb2_grpc as v1_grpc
from hybridserve.server.core.errors import ERROR_TABLE
from hybridserve.server.core.settings import DEFAULT_OPEN_PATHS, Settings
from hybridserve.server.repository import builtin_repository
from tests.conftest import FIXTURES, LocalServer, write_spec
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
                                    "HYBRIDSERVE_MAX_BODY_BYTES": "200000"}).wait_ready(timeout=300)
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


@pytest.mark.parametrize("size, fits", [((60, 80), True), ((80, 80), False), ((20, 120), False)])
@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_image_limits_apply_to_oip_tensors(limited, transport, size, fits):
    """HYBRIDSERVE_MAX_IMAGE_PIXELS/_SIDE hold for Open Inference Protocol inputs too (tritonclient over HTTP
    and gRPC): encoded images (``image``) and pixel arrays (``image_pixels``) alike, as 413 payload_too_large."""
    module = httpclient if transport == "http" else grpcclient
    client = module.InferenceServerClient(limited.url.removeprefix("http://") if transport == "http"
                                          else limited.grpc_target)
    pixels = np.random.default_rng(1).integers(0, 256, (1, *size, 3), dtype=np.uint8)
    encoded = np.array([image(*size)], dtype=np.object_)
    for name, array, datatype in (("image", encoded, "BYTES"), ("image_pixels", pixels, "UINT8")):
        tensor = module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        if fits:
            assert client.infer("classifier", [tensor]).as_numpy("probabilities").shape == (1, 10)
            continue
        with pytest.raises(InferenceServerException) as error:
            client.infer("classifier", [tensor])
        assert "exceeds the limit of 5000 pixels (at most 100 per side)" in error.value.message()
        expected = "413" if transport == "http" else f"StatusCode.{ERROR_TABLE['payload_too_large'].grpc_status}"
        assert error.value.status() == expected


def test_body_limit_applies_to_the_typed_and_oip_routes(limited):
    big = b"\x00" * 300_000
    typed = httpx.post(f"{limited.url}/v1/models/classifier/classify", content=big,
                       headers={"Content-Type": "image/png"}, timeout=30)
    oip = httpx.post(f"{limited.url}/v2/models/classifier/infer", content=big,
                     headers={"Content-Type": "application/json"}, timeout=30)
    assert typed.status_code == 413 and oip.status_code == 413


@pytest.fixture(scope="module")
def deadlined(tmp_path_factory):
    """A slow model (1.5 s a batch) behind a 0.5 s default deadline and an API key."""
    repo = tmp_path_factory.mktemp("deadline")
    write_spec(repo, "slow", task="classification", architecture=f"python:{FIXTURES}/slow_model.py:SlowClassifier",
               architecture_args={"delay_s": 1.5}, preprocessing={"input_size": [16, 16]}, labels=["a", "b"],
               batching={"max_batch_size": 1, "max_wait_ms": 0})
    server = LocalServer(repo, env={"HYBRIDSERVE_REQUEST_TIMEOUT_S": "0.5", "HYBRIDSERVE_API_KEYS": "sesame"})
    server.wait_ready(timeout=300)  # /readyz is an open path: no key
    try:
        yield server
    finally:
        server.stop()


def test_default_deadline_applies_over_http_and_grpc(deadlined):
    """HYBRIDSERVE_REQUEST_TIMEOUT_S bounds a request that names no deadline; one that names a longer one waits."""
    body = image(16, 16)
    key = {"X-API-Key": "sesame", "Content-Type": "image/png"}
    late = httpx.post(f"{deadlined.url}/v1/models/slow/classify", content=body, headers=key, timeout=30)
    assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
    assert "within 0.5s" in late.json()["error"]["message"]
    patient = httpx.post(f"{deadlined.url}/v1/models/slow/classify", content=body, timeout=30,
                         headers={**key, "X-Request-Timeout": "20"})
    assert patient.status_code == 200, patient.text
    with grpc.insecure_channel(deadlined.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as error:
            v1_grpc.HybridServeStub(channel).Classify(v1.ClassifyRequest(model="slow", image=body), timeout=30,
                                                      metadata=[("x-api-key", "sesame")])
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "within 0.5s" in error.value.details()


@pytest.mark.parametrize("variable, value", [("HYBRIDSERVE_API_KEY", "sesame"), ("HYBRIDSERVE_TOKEN", "sesame"),
                                             ("HYBRIDSERVE_API_KEY", "wrong")])
def test_the_client_command_reads_its_credentials_from_the_environment(deadlined, tmp_path, monkeypatch, capsys,
                                                                       variable, value):
    from hybridserve_client.cli import main

    path = tmp_path / "in.png"
    path.write_bytes(image(16, 16))
    monkeypatch.delenv("HYBRIDSERVE_API_KEY", raising=False)
    monkeypatch.delenv("HYBRIDSERVE_TOKEN", raising=False)
    monkeypatch.setenv(variable, value)
    status = main(["classify", deadlined.url, "slow", str(path), "--timeout", "20"])
    assert status == (0 if value == "sesame" else 1), capsys.readouterr()
