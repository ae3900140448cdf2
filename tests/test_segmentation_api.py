"""Semantic segmentation end to end on the served built-in ``segmenter`` (Ray): typed HTTP in every
body form, answered as the PNG label image (the default) or JSON (the mask as PNG, or each class's
run lengths on request), the Open Inference Protocol over HTTP and gRPC (tritonclient), and the
typed gRPC service. The answers are checked against the scenes' true class maps (held-out seeds),
and every transport must give the same mask.
"""

from __future__ import annotations

import base64
import io

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import json_format
from PIL import Image

from hybridserve_client._grpc.hybridserve.v1 import hybridserve_pb2 as v1
from hybridserve_client._grpc.hybridserve.v1 import hybridserve_pb2_grpc as v1_grpc
from hybridserve_client.schemas import SegmentationResult
from hybridserve.models.training.segscenes import CLASS_NAMES, held_out_segmentation_scenes
from tests.test_http_api import png

MODEL = "segmenter"


@pytest.fixture(scope="module")
def scenes():
    return held_out_segmentation_scenes(3)


def mask_of(png_bytes: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png_bytes)))


def pixel_accuracy(mask: np.ndarray, truth: np.ndarray) -> float:
    return float((mask == truth).mean())


def segment_http(server, body: bytes | None = None, **kwargs) -> httpx.Response:
    if body is not None:
        kwargs["content"] = body
    return httpx.post(f"{server.http_url}/v1/models/{MODEL}/segment", timeout=60, **kwargs)


JSON = {"Accept": "application/json"}


def check_json(result: SegmentationResult, scene) -> np.ndarray:
    """The mask of a JSON answer, after checking its size, labels and class counts against it."""
    assert (result.width, result.height) == (scene.scene.image.shape[1], scene.scene.image.shape[0])
    assert result.labels == list(CLASS_NAMES)
    mask = result.mask_array()
    assert mask.shape == scene.class_map.shape
    counts = np.bincount(mask.reshape(-1), minlength=len(CLASS_NAMES))
    assert {c.index: c.pixels for c in result.classes} == {i: int(n) for i, n in enumerate(counts) if n}
    assert result.classes[0].pixels == max(c.pixels for c in result.classes)
    return mask


def test_every_http_body_form_gives_the_same_mask(server, scenes):
    """Raw bytes, multipart and JSON base64; each answered as the PNG label image (the default) and as JSON.
    (Images come in the body only: the API takes no image URLs.)"""
    server.need(MODEL)
    scene = scenes[0]
    image = png(scene.scene.image)
    forms = {
        "raw": {"content": image, "headers": {"Content-Type": "image/png"}},
        "multipart": {"files": {"image": ("scene.png", image, "image/png")}},
        "json": {"json": {"image": base64.b64encode(image).decode()}},
    }
    masks = []
    for name, form in forms.items():
        label_image = segment_http(server, **form)
        assert label_image.status_code == 200, (name, label_image.text)
        assert label_image.headers["content-type"] == "image/png", name
        assert int(label_image.headers["X-Image-Width"]) == scene.scene.image.shape[1]
        masks.append(mask_of(label_image.content))
        answer = segment_http(server, **{**form, "headers": {**form.get("headers", {}), **JSON}})
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/json", name
        result = SegmentationResult.model_validate(answer.json())
        assert result.mask_format == "png" and all(c.rle is None for c in result.classes)
        masks.append(check_json(result, scene))
    assert all(np.array_equal(masks[0], m) for m in masks[1:])
    assert pixel_accuracy(masks[0], scene.class_map) > 0.9


def test_run_lengths_on_request(server, scenes):
    """format=rle, as a query parameter, a JSON field or a form field: JSON with each class's runs, no PNG;
    the runs rebuild the same mask the PNG label image holds."""
    server.need(MODEL)
    scene = scenes[1]
    image = png(scene.scene.image)
    label_image = mask_of(segment_http(server, image, headers={"Content-Type": "image/png"}).content)
    answers = [
        segment_http(server, image, headers={"Content-Type": "image/png"}, params={"format": "rle"}),
        segment_http(server, json={"image": base64.b64encode(image).decode(), "format": "rle"}),
        segment_http(server, files={"image": ("scene.png", image, "image/png")}, data={"format": "rle"}),
    ]
    for answer in answers:
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/json", answer.text
        body = answer.json()
        assert body["mask_format"] == "rle" and body["mask"] is None
        for found in body["classes"]:
            runs = found["rle"]
            assert sum(runs) == scene.class_map.size and sum(runs[1::2]) == found["pixels"]
        assert np.array_equal(check_json(SegmentationResult.model_validate(body), scene), label_image)


def test_a_format_of_another_task_is_refused(server, scenes):
    server.need(MODEL)
    image = png(scenes[0].scene.image)
    jpeg = segment_http(server, image, headers={"Content-Type": "image/png"}, params={"format": "jpeg"})
    assert jpeg.status_code == 400 and jpeg.json()["error"]["code"] == "invalid_input"
    assert "png, rle" in jpeg.json()["error"]["message"]
    unknown = segment_http(server, image, headers={"Content-Type": "image/png"}, params={"format": "gif"})
    assert unknown.status_code == 400
    if server.has("denoiser"):
        restored = httpx.post(f"{server.http_url}/v1/models/denoiser/restore", params={"format": "rle"},
                              content=image, headers={"Content-Type": "image/png"}, timeout=60)
        assert restored.status_code == 400 and "png, jpeg, webp" in restored.json()["error"]["message"]


def test_wrong_verb_and_bad_image_are_clear_errors(server, scenes):
    server.need(MODEL)
    wrong = httpx.post(f"{server.http_url}/v1/models/{MODEL}/classify", content=png(scenes[0].scene.image),
                       headers={"Content-Type": "image/png"}, timeout=30)
    assert wrong.status_code == 400 and "segment" in wrong.json()["error"]["message"]
    broken = segment_http(server, b"not an image", headers={"Content-Type": "image/png"})
    assert broken.status_code == 415 and broken.json()["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_open_inference_protocol_with_tritonclient(server, scenes, transport):
    server.need(MODEL)
    images = np.stack([scene.scene.image for scene in scenes[:2]])
    module = httpclient if transport == "http" else grpcclient
    url = server.http_url.removeprefix("http://") if transport == "http" else server.grpc_target
    client = module.InferenceServerClient(url)
    metadata = client.get_model_metadata(MODEL)
    outputs = [o["name"] for o in metadata["outputs"]] if transport == "http" else [o.name for o in metadata.outputs]
    assert outputs == ["mask", "mask_encoded", "class_pixels"]
    tensor = module.InferInput("image_pixels", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    answer = client.infer(MODEL, [tensor], outputs=[module.InferRequestedOutput(n) for n in ("mask", "class_pixels")])
    masks, counts = answer.as_numpy("mask"), answer.as_numpy("class_pixels")
    assert masks.shape == images.shape[:3] and counts.shape == (2, len(CLASS_NAMES))
    for mask, count, scene in zip(masks, counts, scenes):
        assert pixel_accuracy(mask, scene.class_map) > 0.9
        assert list(count) == list(np.bincount(mask.reshape(-1), minlength=len(CLASS_NAMES)))
    label_image = segment_http(server, png(scenes[0].scene.image), headers={"Content-Type": "image/png"})
    assert np.array_equal(masks[0], mask_of(label_image.content))


def test_typed_grpc_segment(server, scenes):
    server.need(MODEL)
    scene = scenes[2]
    with grpc.insecure_channel(server.grpc_target) as channel:
        answer = v1_grpc.HybridServeStub(channel).Segment(v1.SegmentRequest(model=MODEL, image=png(scene.scene.image)),
                                                          timeout=60)
        assert (answer.width, answer.height) == (scene.scene.image.shape[1], scene.scene.image.shape[0])
        assert list(answer.labels) == list(CLASS_NAMES)
        assert pixel_accuracy(mask_of(answer.mask), scene.class_map) > 0.9
        assert sum(c.pixels for c in answer.classes) == scene.class_map.size
        assert answer.mask_format == "png" and not any(c.rle for c in answer.classes)
        runs = v1_grpc.HybridServeStub(channel).Segment(
            v1.SegmentRequest(model=MODEL, image=png(scene.scene.image), format="rle"), timeout=60)
        assert runs.mask_format == "rle" and not runs.mask
        fields = json_format.MessageToDict(runs, preserving_proto_field_name=True,
                                           always_print_fields_with_no_presence=True)
        assert np.array_equal(SegmentationResult.model_validate(fields).mask_array(), mask_of(answer.mask))
        with pytest.raises(grpc.RpcError) as bad_format:
            v1_grpc.HybridServeStub(channel).Segment(
                v1.SegmentRequest(model=MODEL, image=png(scene.scene.image), format="webp"), timeout=60)
        assert bad_format.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as wrong:
            v1_grpc.HybridServeStub(channel).Segment(v1.SegmentRequest(model="classifier", image=png(scene.scene.image)),
                                                     timeout=60)
        assert wrong.value.code() == grpc.StatusCode.INVALID_ARGUMENT
