"""The built-in restoration and IQA models, and the full-reference metrics, measured for real.

Full-reference metrics are compared with independent implementations on the five TID2013
pairs in ``../shared/eval/iqa``: PSNR and the per-channel (``channels: rgb``) SSIM with
scikit-image, the per-channel MS-SSIM with the ``pytorch-msssim`` package (which follows Wang
et al. 2003's valid-window filtering). The served defaults, which follow the official
implementations, are checked against their published scores in ``test_fr_iqa_reference.py``.

The trained models are loaded from the committed specs and weights, exactly as the server
loads them, and re-measured on the held-out photographs (``photos.HELD_OUT_PHOTOS``, never
seen in training): x2 super-resolution against bicubic upscaling (PSNR on luma Y), the
denoiser against its noisy input (sigma 25, RGB PSNR), the NR-IQA model by rank correlation
with the strength of blur, noise and JPEG distortions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hybridserve.models import create_model
from hybridserve.models.training import photos
from hybridserve.server.core.spec import ModelSpec
from hybridserve.server.repository import load_spec

torch.set_num_threads(1)

REPOSITORY = Path(__file__).resolve().parents[1] / "models" / "repository"
TID2013_PAIRS = Path(__file__).resolve().parents[2] / "shared" / "eval" / "iqa"


def load(name: str, **args) -> tuple[ModelSpec, torch.nn.Module]:
    """A committed spec's module; ``args`` override its architecture_args (another served variant)."""
    spec = load_spec(REPOSITORY / f"{name}.yaml")
    loaded = create_model(spec.architecture, weights=spec.weights, base_dir=spec.base_dir,
                          args={**spec.architecture_args, **args})
    return spec, loaded.module


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (1, 3, H, W) in [0, 1], as the server feeds full-reference metrics."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0


@pytest.fixture(scope="module")
def tid2013_pairs() -> list[tuple[str, np.ndarray, np.ndarray]]:
    if not (TID2013_PAIRS / "ref").is_dir():
        pytest.skip(f"TID2013 calibration pairs not found at {TID2013_PAIRS} (the shared eval folder is absent)")
    pairs = []
    for ref_path in sorted((TID2013_PAIRS / "ref").glob("*.bmp")):
        reference = np.asarray(Image.open(ref_path).convert("RGB"))
        distorted = np.asarray(Image.open(TID2013_PAIRS / "dist" / ref_path.name).convert("RGB"))
        pairs.append((ref_path.name, reference, distorted))
    assert len(pairs) == 5
    return pairs


@pytest.mark.parametrize("name", ["psnr", "ssim", "ms-ssim"])
def test_metric_specs_are_weight_free_full_reference(name: str) -> None:
    spec, module = load(name)
    assert spec.task == "iqa" and spec.needs_reference and spec.weights is None
    assert not spec.preprocessing.normalize
    assert module.higher_is_better and spec.iqa.higher_is_better
    assert tuple(module.range) == spec.iqa.range
    assert len(module.state_dict()) == 0


def test_psnr_matches_scikit_image(tid2013_pairs) -> None:
    from skimage.metrics import peak_signal_noise_ratio

    _, psnr = load("psnr")
    for name, reference, distorted in tid2013_pairs:
        expected = peak_signal_noise_ratio(reference, distorted, data_range=255)
        assert psnr(to_tensor(reference), to_tensor(distorted)).item() == pytest.approx(expected, abs=1e-3), name
    same = to_tensor(tid2013_pairs[0][1])
    assert psnr(same, same).item() == 100.0


def test_rgb_ssim_matches_scikit_image(tid2013_pairs) -> None:
    from skimage.metrics import structural_similarity

    _, ssim = load("ssim", channels="rgb")
    for name, reference, distorted in tid2013_pairs:
        expected = structural_similarity(
            reference, distorted, channel_axis=-1, data_range=255,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        )
        assert ssim(to_tensor(reference), to_tensor(distorted)).item() == pytest.approx(expected, abs=1e-3), name


def test_rgb_ms_ssim_matches_pytorch_msssim(tid2013_pairs) -> None:
    pytorch_msssim = pytest.importorskip("pytorch_msssim", reason="the MS-SSIM reference is a test dependency")
    _, ms_ssim = load("ms-ssim", channels="rgb")
    batch_ref = torch.cat([to_tensor(r) for _, r, _ in tid2013_pairs])
    batch_dist = torch.cat([to_tensor(d) for _, _, d in tid2013_pairs])
    expected = pytorch_msssim.ms_ssim(batch_ref.double(), batch_dist.double(), data_range=1.0, size_average=False)
    measured = ms_ssim(batch_ref, batch_dist)
    assert measured.shape == (5,)
    assert torch.allclose(measured.double(), expected, atol=1e-3, rtol=0), (measured, expected)
    assert float(measured.min()) > 0.5 and float(measured.max()) < 1.0


# --- trained restoration and NR-IQA models, measured on the held-out photographs -------------


def luma(image: np.ndarray) -> np.ndarray:
    """BT.601 Y on 0-255 values, not rounded (the SR papers' convention, ../shared/eval/README.md)."""
    rgb = image.astype(np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


@torch.no_grad()
def run_restorer(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """One whole uint8 image through the model, output rounded to uint8 as the server returns it."""
    return photos.to_uint8(model(photos.to_tensor(image)))[0]


def test_super_resolution_x2_beats_bicubic_by_1db_psnr_y() -> None:
    from skimage.metrics import peak_signal_noise_ratio

    spec, model = load("super-resolution-x2")
    assert spec.task == "restoration" and spec.restoration.kind == "super-resolution"
    assert not spec.preprocessing.normalize and spec.preprocessing.tile % model.pad_multiple == 0
    scale = model.scale
    assert scale == 2
    gains = {}
    for name, hr in zip(photos.HELD_OUT_PHOTOS, photos.load_photos(photos.HELD_OUT_PHOTOS, scale * model.pad_multiple)):
        lr = photos.downscale(hr, scale)
        shave = (slice(scale, -scale), slice(scale, -scale))
        target = luma(hr)[shave]
        restored = peak_signal_noise_ratio(target, luma(run_restorer(model, lr))[shave], data_range=255)
        bicubic = peak_signal_noise_ratio(target, luma(photos.upscale(lr, scale))[shave], data_range=255)
        gains[name] = restored - bicubic
    assert min(gains.values()) > 0, gains
    assert np.mean(list(gains.values())) >= 1.0, gains


def test_denoiser_gains_6db_on_sigma_25_noise() -> None:
    from skimage.metrics import peak_signal_noise_ratio

    spec, model = load("denoiser")
    assert spec.task == "restoration" and spec.restoration.kind == "denoising" and model.scale == 1
    rng = np.random.default_rng(7)
    gains = {}
    for name, clean in zip(photos.HELD_OUT_PHOTOS, photos.load_photos(photos.HELD_OUT_PHOTOS, model.pad_multiple)):
        noisy = photos.add_noise(clean, 25.0, rng)
        denoised = run_restorer(model, noisy)
        gains[name] = peak_signal_noise_ratio(clean, denoised) - peak_signal_noise_ratio(clean, noisy)
    assert min(gains.values()) > 3.0, gains
    assert np.mean(list(gains.values())) >= 6.0, gains


@pytest.mark.parametrize("name", ["super-resolution-x2", "denoiser"])
def test_restorer_contract_batches_and_range(name: str) -> None:
    spec, model = load(name)
    tile = spec.preprocessing.tile
    batch = photos.to_tensor([photos.load_photo("astronaut")[:tile, :tile], photos.load_photo("coffee")[:tile, :tile]])
    with torch.no_grad():
        out = model(batch)
        single = model(batch[1:])
    with torch.enable_grad():  # the training path of the window attention (explicit scores)
        explicit = model(batch[1:])
    assert out.shape == (2, 3, tile * model.scale, tile * model.scale)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.allclose(out[1:], single, atol=1e-4)
    assert torch.allclose(single, explicit, atol=1e-4)


def test_quality_model_score_falls_with_distortion_strength() -> None:
    """Per distortion type (blur, noise, JPEG): Spearman(score, -strength) >= 0.85.

    Each held-out photograph at strengths 0 (pristine), 0.2, ..., 1.0 of ``photos.distort``;
    the correlation is computed within each photograph (six images of the same content),
    required to be positive on every photograph and >= 0.85 on average over them. The images
    go through the server's resize and normalisation. Scores of different photographs are
    not compared (see the model card: content shifts the score).
    """
    from scipy.stats import spearmanr

    from hybridserve.server.core.images import resize_for_model

    spec, model = load("quality")
    pre = spec.preprocessing
    assert spec.task == "iqa" and not spec.needs_reference and pre.normalize
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    rng = np.random.default_rng(11)
    strengths = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    held_out = photos.load_photos(photos.HELD_OUT_PHOTOS)
    for kind in photos.DISTORTIONS:
        images = [photos.distort(image, kind, s, rng) for image in held_out for s in strengths]
        batch = photos.to_tensor([resize_for_model(image, pre.input_size, pre.resize)[0] for image in images])
        with torch.no_grad():
            scores = model((batch - mean) / std)
        assert scores.shape == (len(images),)
        assert float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0
        per_photo = [spearmanr(row, [-s for s in strengths]).statistic for row in scores.view(len(held_out), -1).numpy()]
        assert min(per_photo) > 0, (kind, per_photo)
        assert np.mean(per_photo) >= 0.85, (kind, per_photo)
