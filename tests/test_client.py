"""The client SDK end to end on the session's real server: every task, input type and error,
and the per-call timeout, over HTTP and gRPC, with the blocking ``Client`` and the asyncio
``AsyncClient``.

One test body serves all four: ``AsyncClient`` is driven through ``Driven``, which runs each
awaited call to completion on a private event loop.
"""

from __future__ import annotations

import asyncio
import functools
import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from hybridserve_client import (
    AssessmentResult,
    AsyncClient,
    ClassificationResult,
    Client,
    DetectionResult,
    InvalidInput,
    ModelNotFound,
    PayloadTooLarge,
    RestoredImage,
    SegmentationResult,
    Timeout,
    UnprocessableImage,
    UnsupportedMediaType,
    WrongTask,
)
from tests.conftest import needs_eval

VARIANTS = ["http-sync", "http-async", "grpc-sync", "grpc-async"]


class Driven:
    """An AsyncClient whose coroutine methods are run to completion on a private event loop."""

    def __init__(self, url: str, **options: Any):
        self._loop = asyncio.new_event_loop()
        self._client = self._loop.run_until_complete(self._open(url, options))

    @staticmethod
    async def _open(url: str, options: dict[str, Any]) -> AsyncClient:
        return AsyncClient(url, **options)  # grpc.aio channels belong to the loop they are made in

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        return lambda *args, **kwargs: self._loop.run_until_complete(method(*args, **kwargs))

    def close(self) -> None:
        self._loop.run_until_complete(self._client.aclose())
        self._loop.close()


def connect(variant: str, server, **options: Any) -> Client | Driven:
    protocol, mode = variant.split("-")
    if protocol == "grpc":
        from hybridserve.server.cli.main import grpc_servicers

        if not grpc_servicers():
            pytest.skip("this server build registers no gRPC services")
    url = server.http_url if protocol == "http" else f"grpc://{server.grpc_target}"
    return Client(url, **options) if mode == "sync" else Driven(url, **options)


@pytest.fixture(scope="module", params=VARIANTS)
def api(request, server):
    client = connect(request.param, server, timeout=120)
    client.variant = request.param
    yield client
    client.close()


def photo(height: int, width: int) -> np.ndarray:
    """A real photograph (Set5 'baby'), resized, as RGB uint8."""
    image = Image.open(needs_eval("sr", "Set5", "HR", "baby.png")).convert("RGB")
    return np.asarray(image.resize((width, height), Image.BICUBIC))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


# ------------------------------------------------------------------ metadata and health


def test_models_and_health(api, server):
    assert api.live() and api.ready()
    assert {info.name for info in api.models()} == set(server.specs)
    info = api.model("timm-convnext")
    assert (info.task, info.verb, info.status, info.labels) == ("classification", "classify", "ready", 4)
    assert info.input.input_size == (64, 64)
    assert set(api.health().models) == set(server.specs)
    with pytest.raises(ModelNotFound):
        api.model("no-such-model")


# ------------------------------------------------------------------ tasks


def test_classify_held_out_digits_in_one_concurrent_call(api, server):
    server.need("classifier")
    from hybridserve.models.training.digits import load_split

    held_out = load_split()[1]
    images, labels = list(held_out.images[:24]), held_out.labels[:24]
    results = api.classify("classifier", images, top_k=3)
    assert len(results) == 24 and all(isinstance(r, ClassificationResult) for r in results)
    assert all(len(r.predictions) == 3 and r.top1 == r.predictions[0] for r in results)
    correct = sum(int(r.top1.label) == label for r, label in zip(results, labels, strict=True))
    assert correct >= 22, f"{correct}/24 held-out digits right: results are out of order or wrong"


def test_every_input_type_gives_the_same_answer(api, server, tmp_path):
    pixels = photo(80, 96)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    with open(path, "rb") as handle:
        inputs = [str(path), path, path.read_bytes(), handle, Image.fromarray(pixels), pixels]
        results = [api.classify("timm-convnext", item, top_k=4) for item in inputs]
    scores = [[p.score for p in sorted(r.predictions, key=lambda p: p.index)] for r in results]
    assert all(len(s) == 4 for s in scores)
    np.testing.assert_allclose(scores, [scores[0]] * len(scores), atol=1e-4)
    assert {r.top1.label for r in results} <= {"cat", "dog", "bird", "fish"}


def test_detect_held_out_scenes(api, server):
    server.need("detector")
    from hybridserve.models.training.scenes import held_out_scenes

    scenes = held_out_scenes(4)
    results = api.detect("detector", [scene.image for scene in scenes], score_threshold=0.3, max_detections=20)
    matched = total = 0
    for scene, result in zip(scenes, results, strict=True):
        assert isinstance(result, DetectionResult)
        assert (result.height, result.width) == scene.image.shape[:2]
        assert result.boxes.shape == (len(result.detections), 4) and result.scores.shape == (len(result.detections),)
        assert set(result.labels) <= set(server.specs["detector"].labels)
        assert np.all(result.scores >= 0.3) and len(result.detections) <= 20
        total += len(scene.boxes)
        matched += sum(best_iou(truth, result.boxes) >= 0.5 for truth in scene.boxes)
    assert matched >= total // 2, f"only {matched} of {total} objects found"
    drawn = results[0].draw(scenes[0].image)
    assert drawn.size == scenes[0].image.shape[1::-1]
    assert not np.array_equal(np.asarray(drawn), scenes[0].image) or not results[0].detections


def best_iou(box: np.ndarray, boxes: np.ndarray) -> float:
    if not len(boxes):
        return 0.0
    low, high = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=1)
    union = np.prod(box[2:] - box[:2]) + np.prod(boxes[:, 2:] - boxes[:, :2], axis=1) - inter
    return float(np.max(inter / union))


def test_restore_super_resolves_a_real_photo(api, server):
    server.need("craft-x4")
    low = Image.open(needs_eval("sr", "Set5", "LR_bicubic", "X4", "babyx4.png")).convert("RGB").crop((40, 40, 72, 72))
    high = np.asarray(Image.open(needs_eval("sr", "Set5", "HR", "baby.png")).convert("RGB"))[160:288, 160:288]
    result = api.restore("craft-x4", low)
    assert isinstance(result, RestoredImage) and (result.width, result.height, result.format) == (128, 128, "png")
    restored = result.array()
    assert restored.shape == (128, 128, 3) and result.image().size == (128, 128)
    bicubic = np.asarray(low.resize((128, 128), Image.BICUBIC))
    assert psnr(restored, high) > psnr(bicubic, high) + 0.5, "the model should beat bicubic upscaling"
    jpeg = api.restore("craft-x4", low, format="jpeg")
    assert jpeg.format == "jpeg" and jpeg.data[:3] == b"\xff\xd8\xff"


@pytest.mark.parametrize(("model", "scale"), [("super-resolution-x2", 2), ("denoiser", 1)])
def test_restore_builtin_models(api, server, model, scale, tmp_path):
    server.need(model)
    result = api.restore(model, photo(40, 56))
    assert (result.width, result.height) == (56 * scale, 40 * scale)
    result.save(tmp_path / "out.png")
    assert Image.open(tmp_path / "out.png").size == (56 * scale, 40 * scale)


def test_assess_full_reference_pairs(api, server):
    server.need("psnr")
    names = ["I03.bmp", "I04.bmp", "I06.bmp"]
    distorted = [needs_eval("iqa", "dist", name) for name in names]
    references = [needs_eval("iqa", "ref", name) for name in names]
    results = api.assess("psnr", distorted, reference=references)
    for result, dist, ref in zip(results, distorted, references, strict=True):
        assert isinstance(result, AssessmentResult) and result.kind == "full-reference"
        expected = psnr(np.asarray(Image.open(dist).convert("RGB")), np.asarray(Image.open(ref).convert("RGB")))
        assert result.score == pytest.approx(expected, abs=0.01)
    with open(references[0], "rb") as shared:  # one reference (here a file object) serves every image
        same = api.assess("psnr", [references[0], distorted[0]], reference=shared)
    assert same[0].score == pytest.approx(100.0) and same[1].score == pytest.approx(results[0].score)


def test_assess_no_reference(api, server):
    server.need("quality")
    result = api.assess("quality", photo(120, 160))
    assert result.kind == "no-reference" and result.range[0] <= result.score <= result.range[1]


def test_segment_held_out_scenes(api, server):
    server.need("segmenter")
    from hybridserve.models.training.segscenes import held_out_segmentation_scenes

    scenes = held_out_segmentation_scenes(4)
    results = api.segment("segmenter", [scene.scene.image for scene in scenes])
    labels = list(server.specs["segmenter"].labels)
    right = total = 0
    for scene, result in zip(scenes, results, strict=True):
        assert isinstance(result, SegmentationResult) and result.labels == labels
        mask = result.mask_array()
        assert mask.dtype == np.uint8 and mask.shape == scene.class_map.shape == (result.height, result.width)
        counts = np.bincount(mask.reshape(-1), minlength=len(labels))
        assert [c.index for c in result.classes] == [i for i in np.argsort(-counts, kind="stable") if counts[i]]
        for found in result.classes:
            assert found.label == labels[found.index] and found.pixels == counts[found.index]
            assert found.fraction == pytest.approx(found.pixels / mask.size, abs=1e-6)  # the server rounds
        assert Image.open(io.BytesIO(result.mask_png())).mode == "L"
        right += int((mask == scene.class_map).sum())
        total += mask.size
    assert right / total >= 0.95, f"pixel accuracy {right / total:.3f} on held-out scenes (model card: 0.988)"


def held_out_scene(width: int, height: int) -> np.ndarray:
    """The first held-out segmentation scene, resized to width x height (RGB uint8)."""
    from hybridserve.models.training.segscenes import held_out_segmentation_scenes

    image = Image.fromarray(held_out_segmentation_scenes(1)[0].scene.image)
    return np.asarray(image.resize((width, height), Image.BILINEAR))


def test_segment_mask_is_the_input_size(api, server):
    server.need("segmenter")
    result = api.segment("segmenter", held_out_scene(100, 72))
    assert (result.width, result.height) == (100, 72) and result.mask_array().shape == (72, 100)
    assert sum(c.pixels for c in result.classes) == 72 * 100


def test_segment_with_run_lengths(api, server):
    """format="rle": the classes carry their runs, no PNG travels, and the runs give the PNG's mask."""
    server.need("segmenter")
    scenes = [held_out_scene(128, 128), held_out_scene(90, 60)]
    as_png = api.segment("segmenter", scenes)
    as_runs = api.segment("segmenter", scenes, format="rle")
    for png_result, rle_result in zip(as_png, as_runs, strict=True):
        assert (rle_result.mask_format, rle_result.mask) == ("rle", None) and png_result.mask_format == "png"
        assert all(sum(c.rle) == rle_result.width * rle_result.height for c in rle_result.classes)
        assert np.array_equal(rle_result.mask_array(), png_result.mask_array())
        assert [c.pixels for c in rle_result.classes] == [c.pixels for c in png_result.classes]
    with pytest.raises(InvalidInput, match="png, rle"):
        api.segment("segmenter", scenes[0], format="webp")


def test_a_per_call_timeout_overrides_the_clients(api, server):
    server.need("segmenter")
    scene = held_out_scene(128, 128)
    with pytest.raises(Timeout):
        api.segment("segmenter", scene, timeout=0.001)  # the client's own timeout is 120 s
    assert isinstance(api.segment("segmenter", scene), SegmentationResult)
    assert isinstance(api.segment("segmenter", scene, timeout=None), SegmentationResult)
    with pytest.raises(ValueError, match="positive number of seconds"):
        api.segment("segmenter", scene, timeout=-1)


# ------------------------------------------------------------------ errors


@functools.cache
def decompression_bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (50_000, 50_000)).save(buffer, format="PNG")  # small file, 2.5 G pixels
    return buffer.getvalue()


ERROR_CASES = {
    "unknown model": (lambda api, img: api.classify("no-such-model", img), ModelNotFound),
    "wrong task": (lambda api, img: api.restore("timm-convnext", img), WrongTask),
    "segment a classifier": (lambda api, img: api.segment("timm-convnext", img), WrongTask),
    "bad option": (lambda api, img: api.classify("timm-convnext", img, top_k=0), InvalidInput),
    "missing reference": (lambda api, img: api.assess("psnr", img), InvalidInput),
    "empty image": (lambda api, img: api.classify("timm-convnext", b""), UnprocessableImage),
    "not an image": (lambda api, img: api.classify("timm-convnext", b"\x89PNG\r\n\x1a\n" + b"\0" * 40),
                     UnsupportedMediaType),
    "too many pixels": (lambda api, img: api.classify("timm-convnext", decompression_bomb()), PayloadTooLarge),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_each_error_maps_to_its_exception(api, server, case):
    call, expected = ERROR_CASES[case]
    if case == "missing reference":
        server.need("psnr")
    with pytest.raises(expected) as caught:
        call(api, photo(32, 32))
    error = caught.value
    assert type(error) is expected, f"{type(error).__name__}: {error}"
    assert error.message and error.request_id
    if api.variant.startswith("http"):
        assert error.status in (400, 404, 413, 415, 422)


def test_deadline_raises_timeout(api, server):
    impatient = connect(api.variant, server, timeout=0.001, retries=0)
    try:
        with pytest.raises(Timeout):
            impatient.restore("craft-x4", photo(96, 96))
    finally:
        impatient.close()
