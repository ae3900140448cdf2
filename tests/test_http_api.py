"""The typed HTTP API end to end, on the session's real Ray Serve instance."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from hybridserve_client.schemas import (
    AssessmentResult,
    ClassificationResult,
    DetectionResult,
    ErrorResponse,
    Health,
    ModelInfo,
    ModelList,
    RestorationResult,
)
from tests.conftest import needs_eval


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def photo(size: tuple[int, int] = (96, 128)) -> bytes:
    """A real photograph (Set5 'baby'), resized: height, width."""
    image = Image.open(needs_eval("sr", "Set5", "HR", "baby.png")).convert("RGB")
    return png(np.asarray(image.resize((size[1], size[0]), Image.BICUBIC)))


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.http_url, timeout=120) as http:
        yield http


def error_of(response: httpx.Response) -> str:
    return ErrorResponse.model_validate_json(response.content).error.code


# ------------------------------------------------------------------ metadata and health


def test_health_and_readiness(client, server):
    assert Health.model_validate_json(client.get("/healthz").content).status == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200
    health = Health.model_validate_json(ready.content)
    assert set(health.models) == set(server.specs)
    assert all(status == "ready" for status in health.models.values())


def test_model_list_and_info(client, server):
    listing = ModelList.model_validate_json(client.get("/v1/models").content)
    assert {m.name for m in listing.models} == set(server.specs)
    for info in listing.models:
        spec = server.specs[info.name]
        assert (info.task, info.verb, info.status) == (spec.task, spec.verb, "ready")
        assert info.batching.max_batch_size == spec.batching.max_batch_size
        batching = spec.batching
        if batching.tune and batching.latency_slo_ms is None and batching.max_batch_size > 1:
            assert 1 <= info.batching.tuned_batch_size <= batching.max_batch_size, info.batching
        else:
            assert info.batching.tuned_batch_size is None, info.batching
    one = ModelInfo.model_validate_json(client.get("/v1/models/timm-convnext").content)
    assert one.input.input_size == (64, 64) and one.labels == 4 and one.backend == "eager"
    missing = client.get("/v1/models/no-such-model")
    assert missing.status_code == 404 and error_of(missing) == "model_not_found"


def test_openapi_documents_every_route(client):
    schema = client.get("/openapi.json").json()
    for verb in ("classify", "detect", "restore", "assess"):
        operation = schema["paths"][f"/v1/models/{{name}}/{verb}"]["post"]
        assert {"image/png", "multipart/form-data", "application/json"} <= set(operation["requestBody"]["content"])
    assert {"/v1/models", "/v1/models/{name}", "/healthz", "/readyz"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 200
    # Tuples (a box, a score range, an input size) as fixed-length arrays that OpenAPI 3.0 tools read.
    assert "prefixItems" not in json.dumps(schema)
    box = schema["components"]["schemas"]["Detection"]["properties"]["box"]
    assert (box["type"], box["items"], box["minItems"], box["maxItems"]) == ("array", {"type": "number"}, 4, 4)


# ------------------------------------------------------------------ every task, every input form


@pytest.mark.parametrize("form", ["raw", "multipart", "json"])
def test_classify_in_every_input_form(client, form):
    image = photo()
    if form == "raw":
        response = client.post("/v1/models/timm-convnext/classify", content=image,
                               headers={"Content-Type": "image/png"}, params={"top_k": 3})
    elif form == "multipart":
        response = client.post("/v1/models/timm-convnext/classify", files={"image": ("a.png", image, "image/png")},
                               data={"top_k": "3"})
    else:
        response = client.post("/v1/models/timm-convnext/classify",
                               json={"image": base64.b64encode(image).decode(), "top_k": 3})
    assert response.status_code == 200, response.text
    result = ClassificationResult.model_validate_json(response.content)
    assert len(result.predictions) == 3
    assert {p.label for p in result.predictions} <= {"cat", "dog", "bird", "fish"}
    scores = [p.score for p in result.predictions]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001


def test_same_image_same_answer_in_every_form(client):
    image = photo()
    raw = client.post("/v1/models/timm-convnext/classify", content=image, headers={"Content-Type": "image/png"})
    js = client.post("/v1/models/timm-convnext/classify", json={"image": base64.b64encode(image).decode()})
    assert raw.json() == js.json()


def test_classify_builtin_digit(client, server):
    server.need("classifier")
    response = client.post("/v1/models/classifier/classify", content=photo((32, 32)),
                           headers={"Content-Type": "image/png"})
    result = ClassificationResult.model_validate_json(response.content)
    assert len(result.predictions) == 5 and result.predictions[0].label in [str(d) for d in range(10)]


def test_detect(client, server):
    server.need("detector")
    image = photo((120, 200))
    response = client.post("/v1/models/detector/detect", content=image, headers={"Content-Type": "image/png"},
                           params={"score_threshold": 0.0, "max_detections": 7})
    assert response.status_code == 200, response.text
    result = DetectionResult.model_validate_json(response.content)
    assert (result.width, result.height) == (200, 120)
    assert len(result.detections) <= 7
    for det in result.detections:
        x1, y1, x2, y2 = det.box
        assert 0 <= x1 < x2 <= 200 and 0 <= y1 < y2 <= 120
        assert det.label in server.specs["detector"].labels


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_restore_formats(client, server, fmt):
    server.need("craft-x4")
    response = client.post("/v1/models/craft-x4/restore", content=photo((40, 52)),
                           headers={"Content-Type": "image/png"}, params={"format": fmt})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == f"image/{fmt}"
    assert Image.open(io.BytesIO(response.content)).size == (52 * 4, 40 * 4)


def test_restore_as_json(client, server):
    server.need("craft-x4")
    response = client.post("/v1/models/craft-x4/restore", content=photo((24, 30)),
                           headers={"Content-Type": "image/png", "Accept": "application/json"})
    result = RestorationResult.model_validate_json(response.content)
    assert (result.width, result.height, result.format) == (120, 96, "png")
    assert Image.open(io.BytesIO(base64.b64decode(result.image))).size == (120, 96)


def test_assess_full_reference(client, server):
    server.need("psnr")
    reference = photo()
    noisy = np.asarray(Image.open(io.BytesIO(reference))).astype(np.int16)
    noisy = (noisy + np.random.default_rng(0).normal(0, 10, noisy.shape)).clip(0, 255).astype(np.uint8)
    response = client.post("/v1/models/psnr/assess", files={"image": png(noisy), "reference": reference})
    assert response.status_code == 200, response.text
    result = AssessmentResult.model_validate_json(response.content)
    assert result.kind == "full-reference" and result.higher_is_better
    mse = np.mean((noisy.astype(np.float64) - np.asarray(Image.open(io.BytesIO(reference)), dtype=np.float64)) ** 2)
    assert result.score == pytest.approx(10 * np.log10(255**2 / mse), abs=0.01)
    no_reference = client.post("/v1/models/psnr/assess", content=reference, headers={"Content-Type": "image/png"})
    assert no_reference.status_code == 400 and "reference" in no_reference.json()["error"]["message"]


def test_assess_no_reference(client, server):
    server.need("quality")
    response = client.post("/v1/models/quality/assess", content=photo(), headers={"Content-Type": "image/png"})
    result = AssessmentResult.model_validate_json(response.content)
    assert result.kind == "no-reference" and result.range[0] <= result.score <= result.range[1]


def test_the_direct_route_answers_as_the_routes_do(client, server):
    """Inference without a query string skips FastAPI's routing (transports/http_api._direct_inference);
    with one it goes through the routes. Both give the same answer, headers and errors."""
    server.need("classifier")
    image = photo((32, 32))
    headers = {"Content-Type": "image/png"}
    direct = client.post("/v1/models/classifier/classify", content=image, headers=headers)
    routed = client.post("/v1/models/classifier/classify", content=image, headers=headers, params={"top_k": 5})
    assert direct.status_code == routed.status_code == 200
    assert direct.json() == routed.json()
    for response in (direct, routed):
        assert response.headers["x-batch-size"].isdigit() and "compute;dur=" in response.headers["server-timing"]
        assert response.headers["x-request-id"]
    missing = client.post("/v1/models/no-such-model/classify", content=image, headers=headers)
    assert missing.status_code == 404 and error_of(missing) == "model_not_found"
    # Not the hot path's shape: the routes answer (a trailing slash is redirected, an unknown verb is not found).
    assert client.post("/v1/models/classifier/classify/", content=image, headers=headers).status_code == 307
    assert client.post("/v1/models/classifier/no-such-verb", content=image, headers=headers).status_code == 404
    invalid = client.post("/v1/models/classifier/classify", content=image, headers=headers, params={"top_k": 0})
    assert invalid.status_code == 400 and error_of(invalid) == "invalid_input" and "top_k" in invalid.text


# ------------------------------------------------------------------ errors


def test_wrong_verb_names_the_right_one(client):
    response = client.post("/v1/models/timm-convnext/restore", content=photo(), headers={"Content-Type": "image/png"})
    assert response.status_code == 400 and error_of(response) == "wrong_task"
    assert "/v1/models/timm-convnext/classify" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"", "image/png", 422, "unprocessable_image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image/png", 415, "unsupported_media_type"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml", 415, "unsupported_media_type"),
        (b"hello", "text/plain", 415, "unsupported_media_type"),
        (b'{"image": "***"}', "application/json", 400, "invalid_input"),
        (b'{"img": "AAAA"}', "application/json", 400, "invalid_input"),
        (b"{not json", "application/json", 400, "invalid_input"),
    ],
)
def test_bad_input_gets_a_clear_error(client, body, content_type, status, code):
    response = client.post("/v1/models/timm-convnext/classify", content=body, headers={"Content-Type": content_type})
    assert response.status_code == status, response.text
    assert error_of(response) == code


def test_truncated_image_is_422(client):
    image = photo()
    response = client.post("/v1/models/timm-convnext/classify", content=image[: len(image) // 2],
                           headers={"Content-Type": "image/png"})
    assert response.status_code == 422 and error_of(response) == "unprocessable_image"


def test_too_large_body_is_413(client):
    response = client.post("/v1/models/timm-convnext/classify", content=b"\0" * (33 * 1024 * 1024),
                           headers={"Content-Type": "image/png"})
    assert response.status_code == 413 and error_of(response) == "payload_too_large"


def test_decompression_bomb_is_refused_before_decoding(client):
    bomb = io.BytesIO()
    Image.new("1", (50_000, 50_000)).save(bomb, format="PNG")  # ~300 kB that claims 2.5 G pixels
    response = client.post("/v1/models/timm-convnext/classify", content=bomb.getvalue(),
                           headers={"Content-Type": "image/png"})
    assert response.status_code == 413 and error_of(response) == "payload_too_large"


def test_unknown_model_and_route(client):
    response = client.post("/v1/models/nope/classify", content=photo(), headers={"Content-Type": "image/png"})
    assert response.status_code == 404 and error_of(response) == "model_not_found"
    assert client.get("/v1/nothing-here").status_code == 404


def test_bad_query_option_is_400(client):
    response = client.post("/v1/models/timm-convnext/classify", content=photo(), params={"top_k": 0},
                           headers={"Content-Type": "image/png"})
    assert response.status_code == 400 and error_of(response) == "invalid_input"


# ------------------------------------------------------------------ batching


def test_concurrent_requests_are_batched(server):
    image = photo()

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=120) as http:
            return await asyncio.gather(*(
                http.post("/v1/models/timm-convnext/classify", content=image, headers={"Content-Type": "image/png"})
                for _ in range(24)
            ))

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    sizes = [int(r.headers["X-Batch-Size"]) for r in responses]
    assert max(sizes) > 1, sizes
    assert all(1 <= s <= server.specs["timm-convnext"].batching.max_batch_size for s in sizes)
    first = ClassificationResult.model_validate_json(responses[0].content).predictions
    for response in responses[1:]:  # batching never changes an answer
        other = ClassificationResult.model_validate_json(response.content).predictions
        assert [p.index for p in other] == [p.index for p in first]
        assert [p.score for p in other] == pytest.approx([p.score for p in first], abs=1e-5)
