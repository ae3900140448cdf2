"""The typed gRPC service ``hybridserve.v1`` with grpcio, and the one error table across transports.

Each RPC's answer must be the typed HTTP API's answer for the same image (the messages mirror the
HTTP results field for field); each error code that a request can provoke must come back with the
HTTP status and gRPC code of ``ERROR_TABLE`` from the typed and the OIP APIs alike.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import json_format
from PIL import Image
from tritonclient.utils import InferenceServerException

from hybridserve_client._grpc.hybridserve.v1 import hybridserve_pb2 as v1
from hybridserve_client._grpc.hybridserve.v1 import hybridserve_pb2_grpc as v1_grpc
from hybridserve_client.schemas import AssessmentResult, ClassificationResult, DetectionResult, ModelInfo
from hybridserve.server.core.errors import ERROR_TABLE
from tests.test_http_api import png
from tests.test_oip import case_for, set5

CLIENTS = Path(__file__).resolve().parents[1] / "clients"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "protocols.md"
MESSAGE_LIMIT = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def stub(server):
    options = [("grpc.max_receive_message_length", MESSAGE_LIMIT), ("grpc.max_send_message_length", MESSAGE_LIMIT)]
    with grpc.insecure_channel(server.grpc_target, options=options) as channel:
        yield v1_grpc.HybridServeStub(channel)


def as_dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def typed_http(server, model: str, verb: str, files: dict[str, bytes], **query) -> httpx.Response:
    return httpx.post(f"{server.http_url}/v1/models/{model}/{verb}", files=files, params=query, timeout=300)


# ------------------------------------------------------------------ generated code


def test_generated_code_is_up_to_date(tmp_path):
    """Regenerating from the .proto files gives the committed files, byte for byte."""
    spec = importlib.util.spec_from_file_location("generate_protos", CLIENTS / "generate_protos.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    fresh = tmp_path / "_grpc"
    generator.generate(fresh)
    committed = generator.GENERATED
    names = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(committed) for p in committed.rglob("*") if p.suffix in (".py", ".pyi"))
    for name in names:
        stale = f"{name} is stale: run clients/generate_protos.py"
        assert (fresh / name).read_bytes() == (committed / name).read_bytes(), stale


# ------------------------------------------------------------------ models


def test_list_and_get_model_mirror_the_http_api(server, stub):
    listed = stub.ListModels(v1.ListModelsRequest(), timeout=60)
    assert {info.name for info in listed.models} == set(server.specs)
    for name in server.specs:
        info = as_dict(stub.GetModel(v1.GetModelRequest(name=name), timeout=60))
        info["input"]["input_size"] = info["input"]["input_size"] or None
        http = ModelInfo.model_validate_json(httpx.get(f"{server.http_url}/v1/models/{name}").content)
        assert ModelInfo.model_validate(info).model_dump(exclude={"load_seconds"}) == http.model_dump(
            exclude={"load_seconds"})


# ------------------------------------------------------------------ the four tasks


@pytest.mark.parametrize("model", ["timm-convnext", "classifier"])
def test_classify(server, stub, model):
    image = png(case_for(server, model).images[0])
    answer = stub.Classify(v1.ClassifyRequest(model=model, image=image, top_k=3), timeout=300)
    http = typed_http(server, model, "classify", {"image": image}, top_k=3).json()
    grpc_result = ClassificationResult.model_validate(as_dict(answer))
    assert [p.label for p in grpc_result.predictions] == [p["label"] for p in http["predictions"]]
    np.testing.assert_allclose([p.score for p in grpc_result.predictions], [p["score"] for p in http["predictions"]],
                               rtol=1e-4, atol=1e-6)


def test_classify_an_image_larger_than_4_mb(server, stub):
    server.need("timm-convnext")
    image = png(np.random.default_rng(2).integers(0, 256, (1100, 1400, 3), dtype=np.uint8))
    assert len(image) > 4 * 1024 * 1024
    answer = ClassificationResult.model_validate(as_dict(stub.Classify(
        v1.ClassifyRequest(model="timm-convnext", image=image), timeout=300)))
    http = typed_http(server, "timm-convnext", "classify", {"image": image})
    http = ClassificationResult.model_validate_json(http.content)
    assert [p.label for p in answer.predictions] == [p.label for p in http.predictions]


def test_detect(server, stub):
    image = png(case_for(server, "detector").images[0])
    answer = stub.Detect(v1.DetectRequest(model="detector", image=image, score_threshold=0.05, max_detections=5),
                         timeout=300)
    grpc_result = DetectionResult.model_validate(as_dict(answer))
    http = DetectionResult.model_validate_json(
        typed_http(server, "detector", "detect", {"image": image}, score_threshold=0.05, max_detections=5).content)
    assert (grpc_result.width, grpc_result.height) == (http.width, http.height)
    assert grpc_result.detections, "the scene holds shapes the detector should find"
    assert [d.label for d in grpc_result.detections] == [d.label for d in http.detections]
    np.testing.assert_allclose([d.box for d in grpc_result.detections], [d.box for d in http.detections], atol=0.02)


@pytest.mark.parametrize("model", ["super-resolution-x2", "denoiser", "craft-x4"])
def test_restore(server, stub, model):
    image = png(case_for(server, model).images[0])
    answer = stub.Restore(v1.RestoreRequest(model=model, image=image, format="png"), timeout=300)
    http = typed_http(server, model, "restore", {"image": image})
    assert answer.format == "png" and answer.model == model
    restored = np.asarray(Image.open(io.BytesIO(answer.image)))
    expected = np.asarray(Image.open(io.BytesIO(http.content)))
    assert (answer.width, answer.height) == (int(http.headers["X-Image-Width"]), int(http.headers["X-Image-Height"]))
    assert restored.shape == expected.shape
    assert np.abs(restored.astype(int) - expected.astype(int)).max() <= 1
    jpeg = stub.Restore(v1.RestoreRequest(model=model, image=image, format="jpeg"), timeout=300)
    assert jpeg.format == "jpeg" and Image.open(io.BytesIO(jpeg.image)).format == "JPEG"


@pytest.mark.parametrize("model", ["psnr", "ssim", "ms-ssim", "quality"])
def test_assess(server, stub, model):
    case = case_for(server, model)
    image = png(case.images[0])
    files = {"image": image}
    request = v1.AssessRequest(model=model, image=image)
    if case.references is not None:
        files["reference"] = request.reference = png(case.references[0])
    answer = AssessmentResult.model_validate(as_dict(stub.Assess(request, timeout=300)))
    http = AssessmentResult.model_validate_json(typed_http(server, model, "assess", files).content)
    assert answer.model_dump(exclude={"score"}) == http.model_dump(exclude={"score"})
    assert answer.score == pytest.approx(http.score, rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------ one error table, every transport


@dataclass
class BadRequest:
    """A request that must fail with one error code, in a form every API can send."""

    model: str
    verb: str
    image: bytes
    options: dict = field(default_factory=dict)
    timeout_s: float | None = None


def bad_requests(server) -> dict[str, BadRequest]:
    server.need("timm-convnext")
    photo = png(set5("baby", (96, 128)))
    huge = io.BytesIO()
    Image.new("L", (20_000, 1)).save(huge, format="PNG")  # tiny file, refused from its header
    noise = png(np.random.default_rng(3).integers(0, 256, (1100, 1400, 3), dtype=np.uint8))
    model = "timm-convnext"
    return {
        "invalid_input": BadRequest(model, "classify", photo, {"top_k": 0}),
        "wrong_task": BadRequest(model, "detect", photo),
        "model_not_found": BadRequest("no-such-model", "classify", photo),
        "payload_too_large": BadRequest(model, "classify", huge.getvalue()),
        "unsupported_media_type": BadRequest(model, "classify", b"this is not an image"),
        "unprocessable_image": BadRequest(model, "classify", photo[: len(photo) // 2]),
        # decoding a 4.6 MB PNG alone takes far longer than the 1 ms allowed
        "deadline_exceeded": BadRequest(model, "classify", noise, timeout_s=0.001),
    }


BAD_CODES = ["invalid_input", "wrong_task", "model_not_found", "payload_too_large", "unsupported_media_type",
             "unprocessable_image", "deadline_exceeded"]
# Codes no request can provoke against a healthy test server: no authentication is configured, the
# queues are far from full, every model loaded, and internal errors are bugs.
NOT_PROVOKABLE = {"unauthenticated", "overloaded", "model_not_ready", "internal"}
TYPED_RPCS = {
    "classify": ("Classify", v1.ClassifyRequest),
    "detect": ("Detect", v1.DetectRequest),
    "restore": ("Restore", v1.RestoreRequest),
    "assess": ("Assess", v1.AssessRequest),
}


def test_every_table_code_is_tested_or_explained():
    assert set(ERROR_TABLE) == set(BAD_CODES) | NOT_PROVOKABLE



def typed_http_error(server, bad: BadRequest) -> tuple[int, str]:
    headers = {"Content-Type": "image/png"}
    if bad.timeout_s is not None:
        headers["X-Request-Timeout"] = str(bad.timeout_s)
    response = httpx.post(f"{server.http_url}/v1/models/{bad.model}/{bad.verb}", content=bad.image,
                          params=bad.options, headers=headers, timeout=300)
    return response.status_code, response.json()["error"]["code"]


def typed_grpc_error(stub, bad: BadRequest) -> tuple[grpc.StatusCode, str]:
    method, request_type = TYPED_RPCS[bad.verb]
    metadata = [("x-request-timeout", str(bad.timeout_s))] if bad.timeout_s is not None else None
    with pytest.raises(grpc.RpcError) as error:
        getattr(stub, method)(request_type(model=bad.model, image=bad.image, **bad.options), timeout=300,
                              metadata=metadata)
    codes = [value for key, value in error.value.trailing_metadata() if key == "hybridserve-error-code"]
    return error.value.code(), codes[0]


def oip_status(client, module, bad: BadRequest) -> str:
    tensor = module.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([bad.image], dtype=object))
    timeout_us = None if bad.timeout_s is None else int(bad.timeout_s * 1e6)
    with pytest.raises(InferenceServerException) as error:
        client.infer(bad.model, [tensor], parameters=bad.options or None, timeout=timeout_us)
    return error.value.status()


@pytest.mark.parametrize("code", BAD_CODES)
def test_error_table_in_both_transports(server, stub, code):
    bad = bad_requests(server)[code]
    kind = ERROR_TABLE[code]
    assert typed_http_error(server, bad) == (kind.http_status, code)
    assert typed_grpc_error(stub, bad) == (grpc.StatusCode[kind.grpc_status], code)
    if code == "wrong_task":  # OIP has no task verbs
        return
    http = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"), network_timeout=300)
    assert oip_status(http, httpclient, bad) == str(kind.http_status)
    assert oip_status(grpcclient.InferenceServerClient(server.grpc_target), grpcclient, bad) == str(grpc.StatusCode[kind.grpc_status])



# ------------------------------------------------------------------ docs/protocols.md


def test_protocol_docs_examples_work_as_written(server, tmp_path, monkeypatch):
    """Every python and bash block of docs/protocols.md runs against the server (only the ports differ)."""
    server.need("classifier")
    monkeypatch.chdir(tmp_path)
    Image.fromarray(set5("head", (64, 64))).save("image.png")
    ports = {"localhost:8000": f"localhost:{server.http_url.rsplit(':', 1)[1]}",
             "localhost:9000": f"localhost:{server.grpc_target.rsplit(':', 1)[1]}"}
    blocks = re.findall(r"```(python|bash)\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert sorted({language for language, _ in blocks}) == ["bash", "python"] and len(blocks) >= 4
    for language, code in blocks:
        for default, actual in ports.items():
            code = code.replace(default, actual)
        if language == "python":
            with contextlib.redirect_stdout(io.StringIO()) as printed:
                exec(compile(code, str(DOCS), "exec"), {"__name__": "docs_example"})
            output = printed.getvalue()
        else:
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            output = done.stdout
            assert '"top_k_labels"' in output and '"error"' not in output
        assert output.strip(), code


def test_docs_error_table_is_the_error_table():
    rows = re.findall(r"^\| `(\w+)` \| (\d{3}) \| ([A-Z_]+) \|", DOCS.read_text(), re.MULTILINE)
    assert {code: (int(status), name) for code, status, name in rows} == {
        code: (kind.http_status, kind.grpc_status) for code, kind in ERROR_TABLE.items()}
