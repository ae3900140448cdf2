"""The segmentation section of a spec, served by ``hybridserve serve --no-ray``: the built-in segmenter's
weights under four specs. ``output_size: model`` answers masks of the model's input size; ``letterbox``
cuts the padding off before the mask goes back to the image's size; ``tiled`` runs a large image at its
own resolution in overlapping windows, which labels a mosaic of held-out scenes better than squeezing
it into the model's 128 x 128 input. Specs that cannot work are refused when the repository loads.
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
import yaml
from PIL import Image

from hybridserve_client.schemas import SegmentationResult
from hybridserve.models.training.segscenes import held_out_segmentation_scenes
from hybridserve.server.core.spec import SpecError
from hybridserve.server.repository import builtin_repository, load_repository
from tests.conftest import LocalServer, write_spec
from tests.test_http_api import png

VARIANTS = {
    "seg-model-size": {"segmentation": {"output_size": "model"}},
    "seg-letterbox": {"preprocessing": {"resize": "letterbox"}},
    "seg-tiled": {"preprocessing": {"tile": 128, "tile_overlap": 32}, "segmentation": {"tiled": True}},
}


def builtin_spec() -> dict:
    spec = yaml.safe_load((builtin_repository() / "segmenter.yaml").read_text())
    spec["weights"] = str(builtin_repository() / spec["weights"])
    return spec


def variant(name: str, changes: dict) -> dict:
    spec = builtin_spec()
    for section, values in changes.items():
        spec[section] = {**spec.get(section, {}), **values}
    if spec.get("segmentation", {}).get("tiled"):
        del spec["preprocessing"]["input_size"]
    return {**spec, "name": name}


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    repo = tmp_path_factory.mktemp("segmentation-options")
    for name, changes in {"segmenter": {}, **VARIANTS}.items():
        write_spec(repo, **variant(name, changes))
    server = LocalServer(repo).wait_ready(timeout=300)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mosaic() -> tuple[np.ndarray, np.ndarray]:
    """Four held-out scenes in a 2 x 2 mosaic (256 x 256 pixels) and its true class map."""
    scenes = held_out_segmentation_scenes(4)
    rows = [np.concatenate([scenes[i].scene.image, scenes[i + 1].scene.image], axis=1) for i in (0, 2)]
    truth = [np.concatenate([scenes[i].class_map, scenes[i + 1].class_map], axis=1) for i in (0, 2)]
    return np.concatenate(rows, axis=0), np.concatenate(truth, axis=0)


def segment(local, model: str, image: np.ndarray, **params) -> httpx.Response:
    answer = httpx.post(f"{local.url}/v1/models/{model}/segment", content=png(image), params=params,
                        headers={"Content-Type": "image/png"}, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer


def label_image(local, model: str, image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(segment(local, model, image).content)))


def test_model_size_masks(local, mosaic):
    image, _ = mosaic
    assert label_image(local, "seg-model-size", image).shape == (128, 128)
    assert label_image(local, "segmenter", image).shape == (256, 256)
    metadata = httpclient.InferenceServerClient(local.url.removeprefix("http://")).get_model_metadata("seg-model-size")
    assert {o["name"]: o["shape"] for o in metadata["outputs"]}["mask"] == [-1, 128, 128]


def test_letterbox_masks_leave_the_padding_out(local):
    scene = held_out_segmentation_scenes(1)[0]
    wide = np.concatenate([scene.scene.image, scene.scene.image], axis=1)  # 256 x 128: half the input is padding
    truth = np.concatenate([scene.class_map, scene.class_map], axis=1)
    mask = label_image(local, "seg-letterbox", wide)
    assert mask.shape == truth.shape
    # Kept in, the padding (the lower half of the model's input) would stretch over the image's lower half.
    assert float((mask == truth).mean()) > 0.8


def test_tiled_segmentation_of_a_large_image(local, mosaic):
    image, truth = mosaic
    tiled = segment(local, "seg-tiled", image)
    assert int(tiled.headers["X-Batch-Size"]) >= 1
    tiled_mask = np.asarray(Image.open(io.BytesIO(tiled.content)))
    resized_mask = label_image(local, "segmenter", image)
    tiled_accuracy, resized_accuracy = float((tiled_mask == truth).mean()), float((resized_mask == truth).mean())
    assert tiled_accuracy > 0.95 and tiled_accuracy > resized_accuracy + 0.03, (tiled_accuracy, resized_accuracy)
    info = httpx.get(f"{local.url}/v1/models/seg-tiled", timeout=30).json()["input"]
    assert (info["resize"], info["tile"], info["tile_overlap"], info["input_size"]) == ("tiles", 128, 32, None)
    small = held_out_segmentation_scenes(1)[0]  # no larger than one tile: one window, its own size
    assert float((label_image(local, "seg-tiled", small.scene.image[:100, :90]) == small.class_map[:100, :90])
                 .mean()) > 0.9
    runs = SegmentationResult.model_validate(segment(local, "seg-tiled", image, format="rle").json())
    assert np.array_equal(runs.mask_array(), tiled_mask)


@pytest.mark.parametrize("changes, reason", [
    ({"segmentation": {"tiled": True}}, "leave preprocessing.input_size unset"),
    ({"preprocessing": {"resize": "center_crop"}}, "center_crop"),
    ({"restoration": {"kind": "denoising"}}, "only for task: restoration"),
])
def test_specs_that_cannot_work_are_refused(tmp_path, changes, reason):
    spec = builtin_spec()
    for section, values in changes.items():
        spec[section] = {**spec.get(section, {}), **values}
    write_spec(tmp_path, **{**spec, "name": "broken"})
    with pytest.raises(SpecError, match=reason):
        load_repository(tmp_path)
