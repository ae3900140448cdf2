"""The built-in restoration and IQA models, and the full-reference metrics, measured for real.

Full-reference metrics are compared with independent implementations on the five TID2013
pairs in ``../shared/eval/iqa``: PSNR and SSIM with scikit-image, MS-SSIM with the
``pytorch-msssim`` package (which follows Wang et al. 2003's valid-window filtering).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hybridserve.models import create_model
from hybridserve.server.spec import ModelSpec, load_spec

torch.set_num_threads(1)

REPOSITORY = Path(__file__).resolve().parents[1] / "models" / "repository"
TID2013_PAIRS = Path(__file__).resolve().parents[2] / "shared" / "eval" / "iqa"


def load(name: str) -> tuple[ModelSpec, torch.nn.Module]:
    spec = load_spec(REPOSITORY / f"{name}.yaml")
    loaded = create_model(spec.architecture, weights=spec.weights, base_dir=spec.base_dir, args=spec.architecture_args)
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


def test_ssim_matches_scikit_image(tid2013_pairs) -> None:
    from skimage.metrics import structural_similarity

    _, ssim = load("ssim")
    for name, reference, distorted in tid2013_pairs:
        expected = structural_similarity(
            reference, distorted, channel_axis=-1, data_range=255,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        )
        assert ssim(to_tensor(reference), to_tensor(distorted)).item() == pytest.approx(expected, abs=1e-3), name


def test_ms_ssim_matches_pytorch_msssim(tid2013_pairs) -> None:
    pytorch_msssim = pytest.importorskip("pytorch_msssim", reason="the MS-SSIM reference is a test dependency")
    _, ms_ssim = load("ms-ssim")
    batch_ref = torch.cat([to_tensor(r) for _, r, _ in tid2013_pairs])
    batch_dist = torch.cat([to_tensor(d) for _, _, d in tid2013_pairs])
    expected = pytorch_msssim.ms_ssim(batch_ref.double(), batch_dist.double(), data_range=1.0, size_average=False)
    measured = ms_ssim(batch_ref, batch_dist)
    assert measured.shape == (5,)
    assert torch.allclose(measured.double(), expected, atol=1e-3, rtol=0), (measured, expected)
    assert float(measured.min()) > 0.5 and float(measured.max()) < 1.0
