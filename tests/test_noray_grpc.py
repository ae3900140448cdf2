"""``hybridserve serve --no-ray`` serves gRPC too: the typed service and the Open Inference Protocol
(tritonclient's gRPC client, unchanged) run in-process over the same data plane as its HTTP API.
"""

from __future__ import annotations

import io
import shutil

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from hybridserve_client._grpc.hybridserve.v1 import hybridserve_pb2 as v1
from hybridserve_client._grpc.hybridserve.v1 import hybridserve_pb2_grpc as v1_grpc
from hybridserve.models.training.segscenes import held_out_segmentation_scenes
from hybridserve.server.repository import builtin_repository
from tests.conftest import LocalServer
from tests.test_http_api import png


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    repo = tmp_path_factory.mktemp("noray-grpc")
    for name in ("classifier", "segmenter"):
        for suffix in (".yaml", ".safetensors"):
            shutil.copy(builtin_repository() / f"{name}{suffix}", repo)
    server = LocalServer(repo).wait_ready(timeout=300)
    try:
        yield server
    finally:
        server.stop()


def test_tritonclient_grpc_against_the_in_process_server(local):
    client = grpcclient.InferenceServerClient(local.grpc_target)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("classifier")
    scene = held_out_segmentation_scenes(1)[0].scene.image
    tensor = grpcclient.InferInput("image_pixels", [1, *scene.shape], "UINT8")
    tensor.set_data_from_numpy(scene[None])
    answer = client.infer("classifier", [tensor])
    probabilities = answer.as_numpy("probabilities")
    assert probabilities.shape == (1, 10) and abs(float(probabilities.sum()) - 1.0) < 1e-3
    typed = httpx.post(f"{local.url}/v1/models/classifier/classify", content=png(scene),
                       headers={"Content-Type": "image/png"}, timeout=30).json()
    assert answer.as_numpy("top_k_indices")[0][0] == typed["predictions"][0]["index"]
    with pytest.raises(InferenceServerException, match="no model named"):
        client.infer("nope", [tensor])


def test_tritonclient_grpc_segments_on_the_in_process_server(local):
    """The segmentation tensors over the in-process OIP gRPC service: ``mask`` [N, H, W] of class indices,
    the same mask the typed HTTP API answers as a PNG, and ``class_pixels`` that count it."""
    scenes = held_out_segmentation_scenes(2)
    images = np.stack([scene.scene.image for scene in scenes])
    client = grpcclient.InferenceServerClient(local.grpc_target)
    assert client.is_model_ready("segmenter")
    metadata = client.get_model_metadata("segmenter")
    assert {o.name: (o.datatype, list(o.shape)) for o in metadata.outputs}["mask"] == ("UINT8", [-1, -1, -1])
    tensor = grpcclient.InferInput("image_pixels", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    answer = client.infer("segmenter", [tensor], outputs=[grpcclient.InferRequestedOutput(name)
                                                          for name in ("mask", "class_pixels")])
    masks, counts = answer.as_numpy("mask"), answer.as_numpy("class_pixels")
    assert masks.shape == images.shape[:3] and masks.dtype == np.uint8
    for mask, count, scene in zip(masks, counts, scenes):
        assert float((mask == scene.class_map).mean()) > 0.9
        assert list(count) == list(np.bincount(mask.reshape(-1), minlength=count.shape[0]))
        label_image = httpx.post(f"{local.url}/v1/models/segmenter/segment", content=png(scene.scene.image),
                                 headers={"Content-Type": "image/png"}, timeout=30)
        assert np.array_equal(mask, np.asarray(Image.open(io.BytesIO(label_image.content))))


def test_typed_grpc_against_the_in_process_server(local):
    scene = held_out_segmentation_scenes(2)[1]
    with grpc.insecure_channel(local.grpc_target) as channel:
        stub = v1_grpc.HybridServeStub(channel)
        names = [m.name for m in stub.ListModels(v1.ListModelsRequest(), timeout=30).models]
        assert names == ["classifier", "segmenter"]
        answer = stub.Segment(v1.SegmentRequest(model="segmenter", image=png(scene.scene.image)), timeout=60)
        http = httpx.post(f"{local.url}/v1/models/segmenter/segment", content=png(scene.scene.image),
                          headers={"Content-Type": "image/png", "Accept": "image/png"}, timeout=30)
        assert answer.mask == http.content  # one data plane under both transports
        with pytest.raises(grpc.RpcError) as error:
            stub.Classify(v1.ClassifyRequest(model="classifier", image=b"junk"), timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(error.value.trailing_metadata())["hybridserve-error-code"] == "unsupported_media_type"
