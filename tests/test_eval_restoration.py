"""Restoration evaluation on the published test sets: layouts, the SR papers' metrics, denoising.

The metrics are checked against independent computations (scikit-image on luma computed here,
the PSNR-Y of tests/test_published_checkpoints.py); the denoising run against DnCNN called
directly through spandrel on the same noisy images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hybridserve.server.evaluation import LocalPredictor, RestorationSet, evaluate, subset
from hybridserve.server.evaluation.datasets import DatasetError, load_pixels, noisy_input
from hybridserve.server.evaluation.metrics import RestorationMetrics
from tests.conftest import needs_eval, write_spec
from tests.test_published_checkpoints import SET5, psnr_y


def luma(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def test_sr_layout_and_matching_folders_pair_the_same_files() -> None:
    root = needs_eval("sr", "Set5")
    sr = RestorationSet.from_sr_folder(root, 4)
    folders = RestorationSet.from_folders(root / "LR_bicubic" / "X4", root / "HR", 4)
    assert [p.name for p in sr.pairs] == SET5 and sr.scale == 4 and sr.name == "Set5"
    assert [(p.input, p.target) for p in sr.pairs] == [(p.input, p.target) for p in folders.pairs]
    assert RestorationSet.from_folders(root / "LR_bicubic" / "X3", root / "HR", 3).scale == 3
    source, target = sr.load(sr.pairs[4])  # woman: 228x344, LR 57x86
    assert target.shape == (344, 228, 3) and Image.open(source).size == (57, 86)
    with pytest.raises(DatasetError, match="--scale"):
        RestorationSet.from_sr_folder(root)  # X2, X3 and X4 are there
    assert [p.name for p in subset(sr, 2).pairs] == ["baby", "woman"]


def test_sr_metrics_are_the_papers_psnr_y_and_ssim_y() -> None:
    from skimage.metrics import structural_similarity

    hr = load_pixels(needs_eval("sr", "Set5", "HR", "bird.png"))
    lr = Image.open(needs_eval("sr", "Set5", "LR_bicubic", "X4", "birdx4.png"))
    bicubic = np.asarray(lr.resize((lr.width * 4, lr.height * 4), Image.BICUBIC))
    psnr, ssim = RestorationMetrics("y", crop=4)(bicubic, hr)
    assert psnr == pytest.approx(psnr_y(bicubic, hr, 4), abs=1e-6)
    expected = structural_similarity(luma(hr)[4:-4, 4:-4], luma(bicubic)[4:-4, 4:-4], data_range=255,
                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ssim == pytest.approx(expected, abs=1e-6)
    rgb_psnr, _ = RestorationMetrics("rgb", crop=0)(bicubic, hr)
    assert rgb_psnr == pytest.approx(10 * np.log10(255**2 / np.mean((bicubic.astype(float) - hr) ** 2)), abs=1e-6)


def test_noise_is_seeded_and_quantised() -> None:
    clean = load_pixels(needs_eval("denoise", "Set12", "01.png"))
    assert clean.ndim == 2
    noisy = noisy_input(clean, 25.0, 0)
    assert noisy.dtype == np.uint8 and noisy.shape == clean.shape
    np.testing.assert_array_equal(noisy, noisy_input(clean, 25.0, 0))
    assert not np.array_equal(noisy, noisy_input(clean, 25.0, 1))
    assert np.std(noisy.astype(float) - clean) == pytest.approx(25.0, rel=0.08)  # a little less where it clips


@pytest.fixture(scope="module")
def dncnn_repository(tmp_path_factory):
    weights = needs_eval("denoise", "checkpoints", "dncnn_25.pth")
    folder = tmp_path_factory.mktemp("dncnn")
    write_spec(folder, "dncnn-25", task="restoration", architecture="spandrel", weights=str(weights),
               preprocessing={"normalize": False, "color": "gray", "mean": [0.0], "std": [1.0], "tile": 512,
                              "tile_overlap": 16},
               restoration={"kind": "denoising"})
    return folder


def test_dncnn_denoising_eval_equals_the_model_called_directly(dncnn_repository) -> None:
    """Two Set12 images (256 and 512 px) in-process; the numbers of a direct spandrel call."""
    import spandrel
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    dataset = subset(RestorationSet.from_clean(needs_eval("denoise", "Set12"), noise_sigma=25, seed=0), 2)
    with LocalPredictor(["dncnn-25"], dncnn_repository) as predictor:
        report = evaluate(predictor, "dncnn-25", dataset)
    assert [row["image"] for row in report.rows] == ["01", "12"]
    assert report.protocol == {"channels": "gray", "crop": 0, "scale": 1, "noise_sigma": 25.0, "seed": 0}
    model = spandrel.ModelLoader().load_from_file(str(needs_eval("denoise", "checkpoints", "dncnn_25.pth"))).eval()
    for row, pair in zip(report.rows, dataset.pairs):
        clean = load_pixels(pair.target)
        noisy = noisy_input(clean, 25.0, 0)
        with torch.inference_mode():
            out = model(torch.from_numpy(noisy)[None, None].float() / 255)[0, 0]
        denoised = out.clamp(0, 1).mul(255).round().byte().numpy()
        assert row["psnr"] == pytest.approx(peak_signal_noise_ratio(clean, denoised, data_range=255), abs=1e-3)
        expected_ssim = structural_similarity(clean, denoised, data_range=255, gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False)
        assert row["ssim"] == pytest.approx(expected_ssim, abs=1e-4)
        assert row["psnr"] > peak_signal_noise_ratio(clean, noisy, data_range=255) + 8
    assert report.value == pytest.approx(np.mean([row["psnr"] for row in report.rows]))
