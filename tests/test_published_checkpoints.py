"""Published checkpoints served through the HTTP API match calling the model directly.

CRAFT x4 on Set5 follows the protocol of ../shared/eval/README.md: output to uint8, shave
``scale`` border pixels, PSNR on luma Y (BT.601, not rounded), averaged over the images.
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from hybridserve.models import create_model
from hybridserve.server.tasks import InferenceRequest, task_of
from hybridserve.server.repository import load_spec
from tests.conftest import SPECS, needs_eval

SET5 = ["baby", "bird", "butterfly", "head", "woman"]


def psnr_y(output: np.ndarray, target: np.ndarray, shave: int) -> float:
    def luma(rgb: np.ndarray) -> np.ndarray:
        rgb = rgb.astype(np.float64)
        return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0

    a = luma(output)[shave:-shave, shave:-shave]
    b = luma(target)[shave:-shave, shave:-shave]
    return float(10 * np.log10(255.0**2 / np.mean((a - b) ** 2)))


def load_rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    return tensor.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def craft_spec(tmp_path_factory):
    checkpoint = needs_eval("sr", "checkpoints", "craft_x4.pth")
    folder = tmp_path_factory.mktemp("craft")
    text = (SPECS / "craft-x4.yaml").read_text().replace("{eval}", str(checkpoint.parents[2]))
    (folder / "craft-x4.yaml").write_text(text)
    return load_spec(folder / "craft-x4.yaml")


@pytest.fixture(scope="module")
def craft_direct(craft_spec):
    """The same checkpoint called directly through spandrel, as its own authors' tooling would."""
    import spandrel

    torch.set_num_threads(max(1, torch.get_num_threads()))
    descriptor = spandrel.ModelLoader().load_from_file(str(needs_eval("sr", "checkpoints", "craft_x4.pth")))
    descriptor.eval()
    return descriptor


def test_craft_x4_set5_served_matches_direct_call(server, craft_direct):
    server.need("craft-x4")
    served, direct = [], []
    with httpx.Client(base_url=server.http_url, timeout=300) as client:
        for name in SET5:
            lr_path = needs_eval("sr", "Set5", "LR_bicubic", "X4", f"{name}x4.png")
            lr = load_rgb(lr_path)
            hr = load_rgb(needs_eval("sr", "Set5", "HR", f"{name}.png"))
            hr = hr[: lr.shape[0] * 4, : lr.shape[1] * 4]
            response = client.post("/v1/models/craft-x4/restore", content=lr_path.read_bytes(),
                                   headers={"Content-Type": "image/png"})
            assert response.status_code == 200, response.text
            out = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
            assert out.shape == hr.shape
            served.append(psnr_y(out, hr, 4))
            with torch.inference_mode():
                reference = craft_direct(torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].float() / 255.0)[0]
            direct.append(psnr_y(to_uint8(reference), hr, 4))
    served_mean, direct_mean = float(np.mean(served)), float(np.mean(direct))
    assert abs(served_mean - direct_mean) <= 0.02, (served, direct)
    assert direct_mean == pytest.approx(32.39, abs=0.05)  # ../shared/eval/README.md


def run_whole_pipeline(spec, loaded, image: np.ndarray) -> np.ndarray:
    handler = task_of(spec.task).handler(spec, loaded, torch.device("cpu"))
    prepared = handler.preprocess(InferenceRequest(image=image))
    outputs = handler.forward(prepared.items)
    return handler.postprocess(prepared, outputs).array, len(prepared.items)


def test_tiling_matches_a_whole_image_pass(craft_spec):
    """An image larger than a tile: overlapping tiles, blended, within 0.05 dB of one whole pass."""
    loaded = create_model(craft_spec.architecture, weights=craft_spec.weights, base_dir=craft_spec.base_dir)
    lr = load_rgb(needs_eval("sr", "Set5", "LR_bicubic", "X4", "babyx4.png"))[:96, :112]
    hr = load_rgb(needs_eval("sr", "Set5", "HR", "baby.png"))[: 96 * 4, : 112 * 4]
    tiled_spec = craft_spec.model_copy(
        update={"preprocessing": craft_spec.preprocessing.model_copy(update={"tile": 48, "tile_overlap": 12})}
    )
    whole, whole_items = run_whole_pipeline(craft_spec, loaded, lr)
    tiled, tiled_items = run_whole_pipeline(tiled_spec, loaded, lr)
    assert whole_items == 1 and tiled_items == 9  # 3 x 3 tiles of 48 px over 96 x 112
    assert whole.shape == tiled.shape == hr.shape
    assert abs(psnr_y(whole, hr, 4) - psnr_y(tiled, hr, 4)) <= 0.05
    assert psnr_y(tiled, whole, 4) > 40  # the two outputs agree closely: no seams
