"""Semantic segmentation end to end on the served built-in ``segmenter``: typed HTTP in every body
form, the mask as PNG bytes, the Open Inference Protocol over HTTP and gRPC (tritonclient), and the
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
    return httpx.post(f"{server.http_url}/v1/models/{MODEL}/segment", content=body, timeout=60, **kwargs)


def test_every_http_body_form_gives_the_same_mask(server, scenes):
    server.need(MODEL)
    scene = scenes[0]
    image = png(scene.scene.image)
    answers = [
        segment_http(server, image, headers={"Content-Type": "image/png"}),
        segment_http(server, files={"image": ("scene.png", image, "image/png")}),
        segment_http(server, headers={"Content-Type": "application/json"},
                     json={"image": base64.b64encode(image).decode()}),
    ]
    masks = []
    for response in answers:
        assert response.status_code == 200, response.text
        result = SegmentationResult.model_validate(response.json())
        assert (result.width, result.height) == (scene.scene.image.shape[1], scene.scene.image.shape[0])
        assert result.labels == list(CLASS_NAMES)
        mask = mask_of(base64.b64decode(result.mask))
        assert mask.shape == scene.class_map.shape
        counts = np.bincount(mask.reshape(-1), minlength=len(CLASS_NAMES))
        assert {c.index: c.pixels for c in result.classes} == {i: int(n) for i, n in enumerate(counts) if n}
        assert result.classes[0].pixels == max(c.pixels for c in result.classes)
        masks.append(mask)
    assert all(np.array_equal(masks[0], m) for m in masks[1:])
    assert pixel_accuracy(masks[0], scene.class_map) > 0.9


def test_mask_as_png_bytes_on_request(server, scenes):
    server.need(MODEL)
    scene = scenes[1]
    response = segment_http(server, png(scene.scene.image), headers={"Content-Type": "image/png",
                                                                    "Accept": "image/png"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert int(response.headers["X-Image-Width"]) == scene.scene.image.shape[1]
    assert pixel_accuracy(mask_of(response.content), scene.class_map) > 0.9


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
    typed = segment_http(server, png(scenes[0].scene.image), headers={"Content-Type": "image/png"}).json()
    assert np.array_equal(masks[0], mask_of(base64.b64decode(typed["mask"])))


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
        with pytest.raises(grpc.RpcError) as wrong:
            v1_grpc.HybridServeStub(channel).Segment(v1.SegmentRequest(model="classifier", image=png(scene.scene.image)),
                                                     timeout=60)
        assert wrong.value.code() == grpc.StatusCode.INVALID_ARGUMENT
