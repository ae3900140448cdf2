"""The Open Inference Protocol (KServe v2) end to end, driven by tritonclient (a client nobody here wrote).

Every model of the session's repository is asked over OIP HTTP (binary and JSON tensors) and OIP gRPC,
two images per request, and each answer must equal the typed HTTP API's for the same image.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from dataclasses import dataclass

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.grpc.service_pb2 as triton_pb
import tritonclient.grpc.service_pb2_grpc as triton_pb_grpc
import tritonclient.http as httpclient
import tritonclient.http.aio as httpclient_aio
from PIL import Image
from tritonclient.utils import InferenceServerException

from hybridserve_client._grpc.hybridserve.oip.v2 import open_inference_pb2
from tests.conftest import needs_eval
from tests.test_http_api import png

MODELS = ["classifier", "detector", "super-resolution-x2", "denoiser", "quality", "psnr", "ssim", "ms-ssim",
          "craft-x4", "timm-convnext"]
# (height, width) of the test photographs per task: small, but MS-SSIM needs 176 pixels a side.
SIZES = {"classification": (96, 128), "restoration": (40, 48), "iqa": (192, 192)}
OUTPUTS = {
    "classification": ["probabilities", "top_k_labels", "top_k_scores", "top_k_indices"],
    "detection": ["boxes", "scores", "labels", "label_names", "count"],
    "restoration": ["restored_image", "restored_encoded"],
    "iqa": ["score"],
    "segmentation": ["mask", "mask_encoded", "class_pixels"],
}
NOT_FOUND = {"http": "404", "grpc": "StatusCode.NOT_FOUND"}
INVALID = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}


def set5(name: str, size: tuple[int, int], gray: bool = False) -> np.ndarray:
    """A Set5 photograph as uint8 RGB [H, W, 3] (R = G = B when ``gray``)."""
    image = Image.open(needs_eval("sr", "Set5", "HR", f"{name}.png")).convert("L" if gray else "RGB")
    return np.asarray(image.convert("RGB").resize((size[1], size[0]), Image.BICUBIC))


def noisy(pixels: np.ndarray, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, 12, pixels.shape)
    return np.clip(pixels + noise, 0, 255).round().astype(np.uint8)


@dataclass
class Case:
    """One model and the two images (plus references for full-reference IQA) sent to it."""

    spec: object
    images: list[np.ndarray]
    references: list[np.ndarray] | None

    @property
    def name(self) -> str:
        return self.spec.name


def case_for(server, name: str) -> Case:
    """Two Set5 photographs, or for detection two held-out scenes of the built-in detector's shapes."""
    server.need(name)
    spec = server.specs[name]
    if spec.task == "detection":
        from hybridserve.models.training.scenes import held_out_scenes

        return Case(spec, [scene.image for scene in held_out_scenes(2)], None)
    gray = spec.preprocessing.color == "gray"
    clean = [set5(photo, SIZES[spec.task], gray) for photo in ("baby", "bird")]
    if spec.needs_reference:
        return Case(spec, [noisy(image, seed) for seed, image in enumerate(clean)], clean)
    return Case(spec, clean, None)


def typed_answer(server, case: Case, row: int, **query) -> dict | np.ndarray:
    """The typed HTTP API's answer for one image: JSON, or the restored pixels."""
    url = f"{server.http_url}/v1/models/{case.name}/{case.spec.verb}"
    image = png(case.images[row])
    if case.references is not None:
        response = httpx.post(url, files={"image": image, "reference": png(case.references[row])}, timeout=300)
    else:
        response = httpx.post(url, content=image, params=query, headers={"Content-Type": "image/png"}, timeout=300)
    assert response.status_code == 200, response.text
    if case.spec.task == "restoration":
        return np.asarray(Image.open(io.BytesIO(response.content)))
    return response.json()


def text(element: bytes | str) -> str:
    """A BYTES element as text (tritonclient gives bytes from binary tensors, str from JSON)."""
    return element.decode() if isinstance(element, bytes) else element


def assert_matches_typed(task: str, outputs: dict[str, np.ndarray], row: int, typed) -> None:
    """One image's OIP tensors against the typed HTTP answer for the same image."""
    if task == "classification":
        predictions = typed["predictions"]
        assert [text(label) for label in outputs["top_k_labels"][row]] == [p["label"] for p in predictions]
        assert outputs["top_k_indices"][row].tolist() == [p["index"] for p in predictions]
        scores = [p["score"] for p in predictions]
        np.testing.assert_allclose(outputs["top_k_scores"][row], scores, rtol=1e-4, atol=1e-6)
        probabilities = outputs["probabilities"][row]
        assert probabilities.sum() == pytest.approx(1.0, abs=1e-4)
        np.testing.assert_allclose(probabilities[outputs["top_k_indices"][row]], outputs["top_k_scores"][row])
    elif task == "detection":
        detections = typed["detections"]
        count = int(outputs["count"][row])
        assert count == len(detections)
        boxes = np.array([d["box"] for d in detections]).reshape(-1, 4)
        np.testing.assert_allclose(outputs["boxes"][row, :count], boxes, atol=0.02)
        np.testing.assert_allclose(outputs["scores"][row, :count], [d["score"] for d in detections], atol=1e-5)
        assert outputs["labels"][row, :count].tolist() == [d["index"] for d in detections]
        assert [text(n) for n in outputs["label_names"][row, :count]] == [d["label"] for d in detections]
        assert (outputs["labels"][row, count:] == -1).all() and (outputs["scores"][row, count:] == 0).all()
    elif task == "restoration":
        restored = outputs["restored_image"][row]
        assert restored.shape == typed.shape
        assert np.abs(restored.astype(int) - typed.astype(int)).max() <= 1  # batch-composition rounding at most
        encoded = outputs["restored_encoded"][row]  # bytes, or base64 text from JSON
        data = encoded if isinstance(encoded, bytes) else base64.b64decode(encoded)
        encoded = np.asarray(Image.open(io.BytesIO(data)))
        np.testing.assert_array_equal(encoded, restored)
    else:
        assert float(outputs["score"][row]) == pytest.approx(typed["score"], rel=1e-4, abs=1e-4)


def http_client(server) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.http_url.removeprefix("http://"), network_timeout=300,
                                            connection_timeout=300)


def encoded_inputs(module, case: Case) -> list:
    """BYTES inputs: the encoded PNG files, N = 2."""
    tensors = [("image", case.images)] + ([("reference", case.references)] if case.references is not None else [])
    inputs = []
    for name, images in tensors:
        tensor = module.InferInput(name, [len(images)], "BYTES")
        tensor.set_data_from_numpy(np.array([png(image) for image in images], dtype=object))
        inputs.append(tensor)
    return inputs


def pixel_inputs_json(case: Case) -> list:
    """UINT8 [N, H, W, 3] inputs as JSON data."""
    tensors = [("image_pixels", case.images)]
    if case.references is not None:
        tensors.append(("reference_pixels", case.references))
    inputs = []
    for name, images in tensors:
        batch = np.stack(images)
        tensor = httpclient.InferInput(name, list(batch.shape), "UINT8")
        tensor.set_data_from_numpy(batch, binary_data=False)
        inputs.append(tensor)
    return inputs


def run_infer(server, case: Case, transport: str) -> dict[str, np.ndarray]:
    names = OUTPUTS[case.spec.task]
    if transport == "http-binary":
        result = http_client(server).infer(case.name, encoded_inputs(httpclient, case))
    elif transport == "http-json":
        outputs = [httpclient.InferRequestedOutput(name, binary_data=False) for name in names]
        result = http_client(server).infer(case.name, pixel_inputs_json(case), outputs=outputs)
        assert all("data" in output for output in result.get_response()["outputs"])
    else:
        result = grpcclient.InferenceServerClient(server.grpc_target).infer(case.name, encoded_inputs(grpcclient, case))
    return {name: result.as_numpy(name) for name in names}


@pytest.fixture(scope="module")
def typed_answers(server):
    """The typed HTTP answers, per (model, image), asked once."""
    cache: dict[tuple[str, int], object] = {}

    def get(case: Case, row: int):
        if (case.name, row) not in cache:
            cache[case.name, row] = typed_answer(server, case, row)
        return cache[case.name, row]

    return get


# ------------------------------------------------------------------ the wire contract


def test_messages_are_wire_compatible_with_tritonclient():
    """Every field of our OIP messages has the name, number and type of the published proto's."""
    ours = open_inference_pb2.DESCRIPTOR.message_types_by_name
    theirs = triton_pb.DESCRIPTOR.message_types_by_name

    def fields(descriptor) -> dict:
        found = {(f.name, f.number, f.type, f.is_repeated) for f in descriptor.fields}
        for nested in descriptor.nested_types:
            found |= {(f"{nested.name}.{k[0]}", *k[1:]) for k in fields(nested)}
        return found

    assert len(ours) == 14  # 6 request/response pairs, InferParameter, InferTensorContents
    for name, descriptor in ours.items():
        assert fields(descriptor) == fields(theirs[name]), name
    service = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"):
        assert service.methods_by_name[method].full_name == f"inference.GRPCInferenceService.{method}"


# ------------------------------------------------------------------ health and metadata


def test_health_and_server_metadata(server):
    http, rpc = http_client(server), grpcclient.InferenceServerClient(server.grpc_target)
    assert http.is_server_live() and http.is_server_ready()
    assert rpc.is_server_live() and rpc.is_server_ready()
    for metadata in (http.get_server_metadata(), rpc.get_server_metadata(as_json=True)):
        assert metadata["name"] == "hybridserve"
        assert {"binary_tensor_data", "parameters"} <= set(metadata["extensions"])
    assert httpx.get(f"{server.http_url}/v2/health/live").json() == {"live": True}


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_model_metadata_declares_the_task_tensors(server, transport):
    client = http_client(server) if transport == "http" else grpcclient.InferenceServerClient(server.grpc_target)
    for name, spec in server.specs.items():
        assert client.is_model_ready(name)
        assert client.is_model_ready(name, "1")
        metadata = client.get_model_metadata(name, **({} if transport == "http" else {"as_json": True}))
        assert metadata["name"] == name and metadata["versions"] == ["1"]
        inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in metadata["inputs"]}
        expected = {"image": ("BYTES", [-1]), "image_pixels": ("UINT8", [-1, -1, -1, 3])}
        if spec.needs_reference:
            expected |= {"reference": ("BYTES", [-1]), "reference_pixels": ("UINT8", [-1, -1, -1, 3])}
        assert inputs == expected
        assert [t["name"] for t in metadata["outputs"]] == OUTPUTS[spec.task]
    if transport == "http":
        assert not client.is_model_ready("no-such-model")  # 404
    else:
        assert failure(lambda: client.is_model_ready("no-such-model")).status() == NOT_FOUND["grpc"]


# ------------------------------------------------------------------ inference equals the typed API


@pytest.mark.parametrize("transport", ["http-binary", "http-json", "grpc"])
@pytest.mark.parametrize("model", MODELS)
def test_two_images_match_the_typed_api(server, typed_answers, model, transport):
    case = case_for(server, model)
    outputs = run_infer(server, case, transport)
    for output in OUTPUTS[case.spec.task]:
        assert outputs[output].shape[0] == 2, output
    for row in range(2):
        assert_matches_typed(case.spec.task, outputs, row, typed_answers(case, row))
    if case.spec.task == "detection":
        assert outputs["count"].sum() > 0, "the scenes hold shapes the detector should find"


def test_typed_contents_instead_of_raw(server, typed_answers):
    """gRPC ``contents`` (typed values, not raw bytes), through tritonclient's own generated stub."""
    case = case_for(server, "timm-convnext")
    request = triton_pb.ModelInferRequest(model_name=case.name)
    encoded = request.inputs.add(name="image", datatype="BYTES", shape=[1])
    encoded.contents.bytes_contents.append(png(case.images[0]))
    pixels = triton_pb.ModelInferRequest(model_name=case.name)
    tensor = pixels.inputs.add(name="image_pixels", datatype="UINT8", shape=[1, *case.images[1].shape])
    tensor.contents.uint_contents.extend(case.images[1].reshape(-1).tolist())
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = triton_pb_grpc.GRPCInferenceServiceStub(channel)
        for row, message in enumerate((request, pixels)):
            response = stub.ModelInfer(message, timeout=300)
            assert [o.name for o in response.outputs] == OUTPUTS["classification"]
            assert len(response.raw_output_contents) == len(response.outputs)
            result = grpcclient.InferResult(response)
            outputs = {name: result.as_numpy(name) for name in OUTPUTS["classification"]}
            assert_matches_typed("classification", outputs, 0, typed_answers(case, row))


def test_base64_bytes_in_json(server, typed_answers):
    case = case_for(server, "timm-convnext")
    tensor = httpclient.InferInput("image", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[base64.b64encode(png(case.images[0]))]], dtype=object), binary_data=False)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=False) for name in OUTPUTS["classification"]]
    result = http_client(server).infer(case.name, [tensor], outputs=outputs, request_id="abc")
    assert result.get_response()["id"] == "abc"
    answer = {name: result.as_numpy(name) for name in OUTPUTS["classification"]}
    assert_matches_typed("classification", answer, 0, typed_answers(case, 0))


def test_parameters_map_to_task_options(server):
    case = case_for(server, "timm-convnext")
    typed = typed_answer(server, case, 0, top_k=2)
    for _, client, module in clients(server):
        outputs = [module.InferRequestedOutput("top_k_labels"), module.InferRequestedOutput("top_k_scores")]
        result = client.infer(case.name, encoded_inputs(module, case)[:1], outputs=outputs, parameters={"top_k": 2})
        assert result.as_numpy("top_k_labels").shape == (2, 2)
        labels = [text(label) for label in result.as_numpy("top_k_labels")[0]]
        assert labels == [p["label"] for p in typed["predictions"]]
        assert result.as_numpy("probabilities") is None  # only the requested outputs come back


def test_detection_parameters(server):
    case = case_for(server, "detector")
    typed = typed_answer(server, case, 0, score_threshold=0.05, max_detections=3)
    result = grpcclient.InferenceServerClient(server.grpc_target).infer(
        case.name, encoded_inputs(grpcclient, case),
        parameters={"score_threshold": "0.05", "max_detections": 3},  # tritonclient sends no floats over gRPC
    )
    outputs = {name: result.as_numpy(name) for name in OUTPUTS["detection"]}
    assert int(outputs["count"][0]) == len(typed["detections"]) <= 3
    assert_matches_typed("detection", outputs, 0, typed)


def test_image_larger_than_4_mb(server):
    """A 4.6 MB image, encoded and as pixels, over gRPC and HTTP (Ray Serve's own transport caps at 4 MB)."""
    case = case_for(server, "timm-convnext")
    pixels = np.random.default_rng(1).integers(0, 256, (1100, 1400, 3), dtype=np.uint8)
    case.images = [pixels]
    encoded = png(pixels)
    assert len(encoded) > 4 * 1024 * 1024
    typed = typed_answer(server, case, 0)
    rpc = grpcclient.InferenceServerClient(server.grpc_target)
    raw = grpcclient.InferInput("image_pixels", [1, *pixels.shape], "UINT8")
    raw.set_data_from_numpy(pixels[None])
    for client, inputs in ((rpc, encoded_inputs(grpcclient, case)), (rpc, [raw]),
                           (http_client(server), encoded_inputs(httpclient, case))):
        result = client.infer(case.name, inputs)
        outputs = {name: result.as_numpy(name) for name in OUTPUTS["classification"]}
        assert_matches_typed("classification", outputs, 0, typed)


def test_restored_sizes_must_agree_for_the_uint8_tensor(server):
    name = next((m for m in ("denoiser", "super-resolution-x2", "craft-x4") if server.has(m)), None)
    case = case_for(server, name or "craft-x4")
    case.images = [case.images[0], case.images[1][:32, :40]]
    client = grpcclient.InferenceServerClient(server.grpc_target)
    with pytest.raises(InferenceServerException) as error:
        client.infer(case.name, encoded_inputs(grpcclient, case))
    assert error.value.status() == INVALID["grpc"] and "restored_encoded" in error.value.message()
    result = client.infer(case.name, encoded_inputs(grpcclient, case),
                          outputs=[grpcclient.InferRequestedOutput("restored_encoded")])
    sizes = [Image.open(io.BytesIO(data)).size for data in result.as_numpy("restored_encoded")]
    assert sizes[0] != sizes[1]


async def test_asyncio_clients(server):
    """tritonclient's asyncio clients, several requests at once, equal to the sync client."""
    case = case_for(server, "timm-convnext")
    expected = run_infer(server, case, "grpc")
    http = httpclient_aio.InferenceServerClient(server.http_url.removeprefix("http://"))
    rpc = grpcclient_aio.InferenceServerClient(server.grpc_target)
    try:
        assert await http.is_server_ready() and await rpc.is_server_ready()
        assert (await rpc.get_model_metadata(case.name, as_json=True))["name"] == case.name
        results = await asyncio.gather(
            *(http.infer(case.name, encoded_inputs(httpclient_aio, case)) for _ in range(3)),
            *(rpc.infer(case.name, encoded_inputs(grpcclient_aio, case)) for _ in range(3)),
        )
    finally:
        await http.close()
        await rpc.close()
    for result in results:
        assert (result.as_numpy("top_k_indices") == expected["top_k_indices"]).all()
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected["probabilities"], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ errors


def clients(server) -> list[tuple[str, object, object]]:
    return [("http", http_client(server), httpclient),
            ("grpc", grpcclient.InferenceServerClient(server.grpc_target), grpcclient)]


def failure(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as error:
        call()
    return error.value


def test_unknown_model_and_version_are_not_found(server):
    case = case_for(server, "timm-convnext")
    for transport, client, module in clients(server):
        inputs = encoded_inputs(module, case)
        for call in (lambda: client.infer("no-such-model", inputs), lambda: client.get_model_metadata("no-such-model"),
                     lambda: client.infer(case.name, inputs, model_version="7")):
            error = failure(call)
            assert error.status() == NOT_FOUND[transport], error.message()
            assert "no-such-model" in error.message() or "'7'" in error.message()


def tensor(module, name: str, shape: list[int], datatype: str, data: np.ndarray):
    """An input whose declared shape may disagree with its data (set_shape skips the client's check)."""
    made = module.InferInput(name, list(data.shape), datatype)
    made.set_data_from_numpy(data)
    made.set_shape(shape)
    return made


BAD_INPUTS = {
    "wrong datatype": ("image_pixels", [1, 8, 8, 3], "FP32", np.zeros((1, 8, 8, 3), np.float32)),
    "wrong shape": ("image_pixels", [1, 8, 8], "UINT8", np.zeros((1, 8, 8), np.uint8)),
    "wrong byte count": ("image_pixels", [1, 8, 9, 3], "UINT8", np.zeros((1, 8, 8, 3), np.uint8)),
    "wrong element count": ("image", [2], "BYTES", np.array([b"x"], dtype=object)),
    "unknown input": ("picture", [1], "BYTES", np.array([b"x"], dtype=object)),
}


@pytest.mark.parametrize("problem", list(BAD_INPUTS))
def test_bad_tensors_are_invalid_and_name_the_input(server, problem):
    name, shape, datatype, data = BAD_INPUTS[problem]
    for transport, client, module in clients(server):
        error = failure(lambda: client.infer("timm-convnext", [tensor(module, name, shape, datatype, data)]))
        assert error.status() == INVALID[transport], error.message()
        assert f"'{name}'" in error.message()


def test_undecodable_image_uses_the_error_table(server):
    for transport, client, module in clients(server):
        error = failure(lambda: client.infer("timm-convnext", [tensor(module, "image", [1], "BYTES",
                                                                       np.array([b"not an image"], dtype=object))]))
        assert error.status() == {"http": "415", "grpc": "StatusCode.INVALID_ARGUMENT"}[transport]
        assert "image" in error.message()


def test_binary_sizes_that_do_not_add_up(server):
    """Raw HTTP with the binary extension: sizes beyond the body, and bytes no input claims."""
    url = f"{server.http_url}/v2/models/timm-convnext/infer"

    def post(size: int, body_bytes: int) -> httpx.Response:
        header = json.dumps({"inputs": [{"name": "image_pixels", "datatype": "UINT8", "shape": [1, 8, 8, 3],
                                         "parameters": {"binary_data_size": size}}]}).encode()
        return httpx.post(url, content=header + bytes(body_bytes), timeout=60,
                          headers={"Inference-Header-Content-Length": str(len(header))})

    for response in (post(192, 100), post(100, 192), post(192, 200)):
        assert response.status_code == 400
        assert set(response.json()) == {"error"}
    assert "'image_pixels'" in post(192, 100).json()["error"]
    assert "8 bytes" in post(192, 200).json()["error"]
    assert post(192, 192).status_code == 200


def test_raw_contents_of_the_wrong_size_over_grpc(server):
    request = triton_pb.ModelInferRequest(model_name="timm-convnext")
    request.inputs.add(name="image_pixels", datatype="UINT8", shape=[1, 8, 8, 3])
    request.raw_input_contents.append(bytes(100))
    with grpc.insecure_channel(server.grpc_target) as channel, pytest.raises(grpc.RpcError) as error:
        triton_pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'image_pixels'" in error.value.details() and "192" in error.value.details()
