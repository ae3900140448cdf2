"""The built-in classifier and detector, loaded from the committed specs and weights.

Quality is re-measured on held-out data the training never saw: the fixed held-out 25% of
scikit-learn's digits (sent through a PNG round trip, as a client would send them) and
generated scenes from the held-out seed range.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from hybridserve.models import create_model
from hybridserve.models.training.detection_eval import (
    ImageDetections,
    ImageTruth,
    evaluate_on_scenes,
    mean_average_precision,
)
from hybridserve.models.training.digits import CLASS_NAMES as DIGIT_NAMES
from hybridserve.models.training.digits import load_split, preprocess
from hybridserve.models.training.scenes import CLASS_NAMES as SHAPE_NAMES
from hybridserve.models.training.scenes import held_out_scenes, scene_batch
from hybridserve.server.core.spec import ModelSpec
from hybridserve.server.repository import builtin_repository, load_spec

HELD_OUT_SCENES = 200


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def load_builtin(name: str) -> tuple[ModelSpec, torch.nn.Module]:
    spec = load_spec(builtin_repository() / f"{name}.yaml")
    loaded = create_model(
        spec.architecture, weights=spec.weights, base_dir=spec.base_dir, args=spec.architecture_args
    )
    return spec, loaded.module


def png_round_trip(pixels: np.ndarray) -> Image.Image:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_classifier_top1_on_held_out_digits() -> None:
    spec, model = load_builtin("classifier")
    assert spec.labels == DIGIT_NAMES
    _, held_out = load_split()
    images = [png_round_trip(pixels) for pixels in held_out.images]
    batch = preprocess(images, spec.preprocessing.input_size, spec.preprocessing.mean, spec.preprocessing.std)
    with torch.no_grad():
        logits = model(batch)
    assert logits.shape == (len(images), len(spec.labels))
    top1 = float((logits.argmax(1).numpy() == held_out.labels).mean())
    assert top1 >= 0.97, f"held-out top-1 {top1:.4f}"


def test_detector_map_on_held_out_scenes() -> None:
    spec, model = load_builtin("detector")
    assert spec.labels == SHAPE_NAMES
    scenes = held_out_scenes(HELD_OUT_SCENES)
    prep = spec.preprocessing
    assert all(scene.image.shape[:2] == tuple(prep.input_size) for scene in scenes)
    result, per_class = evaluate_on_scenes(model, scenes, prep.mean, prep.std, len(spec.labels))
    assert set(per_class) == set(range(len(SHAPE_NAMES)))
    assert result >= 0.8, f"held-out mAP@0.5 {result:.3f}, per class {per_class}"


@pytest.mark.parametrize("batch_size", [1, 3])
def test_detector_output_contract(batch_size: int) -> None:
    spec, model = load_builtin("detector")
    scenes = held_out_scenes(batch_size)
    with torch.no_grad():
        boxes, scores, labels = model(scene_batch(scenes, spec.preprocessing.mean, spec.preprocessing.std))
    k = spec.architecture_args["max_detections"]
    assert boxes.shape == (batch_size, k, 4) and boxes.dtype == torch.float32
    assert scores.shape == (batch_size, k) and scores.dtype == torch.float32
    assert labels.shape == (batch_size, k) and labels.dtype == torch.int64
    assert bool(((boxes >= 0) & (boxes <= 1)).all())
    assert bool((boxes[..., 2:] >= boxes[..., :2]).all())
    assert bool(((scores >= 0) & (scores <= 1)).all())
    assert bool((scores[:, 1:] <= scores[:, :-1]).all()), "scores must be sorted descending"
    assert bool(((labels >= 0) & (labels < len(spec.labels))).all())
    # The best detection of a real scene is confident and overlaps a true object of its class.
    scene = scenes[0]
    best = boxes[0, 0].numpy() * scene.image.shape[1]
    same_class = scene.boxes[scene.labels == int(labels[0, 0])]
    assert float(scores[0, 0]) > 0.5 and len(same_class) > 0
    top_left = np.maximum(best[:2], same_class[:, :2])
    bottom_right = np.minimum(best[2:], same_class[:, 2:])
    assert bool((np.clip(bottom_right - top_left, 0, None).prod(1) > 0).any())


def test_detector_exports_with_dynamic_batch() -> None:
    spec, model = load_builtin("detector")
    images = scene_batch(held_out_scenes(2), spec.preprocessing.mean, spec.preprocessing.std)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (images,), dynamic_shapes=({0: batch},))
    with torch.no_grad():
        expected = model(images[:1])
    for got, want in zip(program.module()(images[:1]), expected):
        torch.testing.assert_close(got, want)


def test_map_of_known_cases() -> None:
    truth = [ImageTruth(np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([0, 0]))]

    def detections(boxes: list[list[float]], scores: list[float]) -> list[ImageDetections]:
        return [ImageDetections(np.array(boxes, float), np.array(scores), np.zeros(len(scores), dtype=np.int64))]

    perfect, _ = mean_average_precision(detections([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8]), truth, 1)
    assert perfect == pytest.approx(1.0)
    # A duplicate of an already matched box ranked second is a false positive: recall 0.5 at
    # precision 1, then recall 1 at precision 2/3 -> AP = 0.5 * 1 + 0.5 * 2/3.
    duplicate, _ = mean_average_precision(
        detections([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], [0.9, 0.8, 0.7]), truth, 1
    )
    assert duplicate == pytest.approx(0.5 + 0.5 * 2 / 3)
    # A box with IoU 0.25 < 0.5 does not count, so only half the truth is found.
    half, per_class = mean_average_precision(detections([[0, 0, 10, 10], [20, 20, 25, 25]], [0.9, 0.8]), truth, 1)
    assert half == pytest.approx(0.5) and per_class == {0: pytest.approx(0.5)}
