"""The served full-reference metrics reproduce the official implementations on TID2013 pairs.

The five reference / distorted pairs of ``../shared/eval/iqa`` are the ones the IQA-PyTorch
toolbox uses to calibrate its metrics; its calibration table (``ResultsCalibra/ResultsCalibra.md``
and ``results_official.csv`` in github.com/chaofengc/IQA-PyTorch) publishes the scores of the
official implementations for them: Wang's ``ssim.m`` and ``msssim.m`` on MATLAB ``rgb2gray``
input (with ``ssim.m``'s automatic downsampling removed, its footnote 2), and PSNR on RGB.
Only those published numbers are used here. Each pair goes through the whole served pipeline
(BMP bytes decoded by the handler, the metric, the typed result) of the committed specs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hybridserve.models import create_model
from hybridserve.models.builtin.metrics import box_downsample
from hybridserve.server.tasks import InferenceRequest, task_of
from hybridserve.server.repository import builtin_repository, load_spec
from tests.conftest import needs_eval

PAIRS = ("I03", "I04", "I06", "I08", "I19")
# IQA-PyTorch's calibration table, rows "SSIM (org)", "MS-SSIM (org)" and "PSNR (org)".
PUBLISHED = {
    "ssim": (0.6993, 0.9978, 0.9989, 0.9669, 0.6519),
    "ms-ssim": (0.6733, 0.9996, 0.9998, 0.9566, 0.8462),
    "psnr": (21.11, 20.99, 27.01, 23.30, 21.62),
}
TOLERANCE = {"ssim": 0.002, "ms-ssim": 0.005, "psnr": 0.01}
# The same calibration's run of the official msssim.m on the BT.601 luma (ResultsCalibra/ms_ssim_org_result.txt,
# "ycbcr input"): the MS-SSIM computation itself, without the rgb2gray question.
PUBLISHED_MS_SSIM_Y = (0.6981, 0.9998, 0.9999, 0.9570, 0.8547)


def served(name: str, args: dict | None = None):
    """The committed spec (optionally with other architecture_args) behind its real handler."""
    spec = load_spec(builtin_repository() / f"{name}.yaml")
    if args is not None:
        spec = spec.model_copy(update={"architecture_args": {**spec.architecture_args, **args}})
    loaded = create_model(spec.architecture, weights=spec.weights, base_dir=spec.base_dir, args=spec.architecture_args)
    handler = task_of(spec.task).handler(spec, loaded, torch.device("cpu"))

    def score(reference: bytes | np.ndarray, distorted: bytes | np.ndarray) -> float:
        prepared = handler.preprocess(InferenceRequest(image=distorted, reference=reference))
        return handler.postprocess(prepared, handler.forward(prepared.items)).value

    return score


@pytest.fixture(scope="module")
def pairs() -> list[tuple[bytes, bytes]]:
    return [(needs_eval("iqa", "ref", f"{n}.bmp").read_bytes(), needs_eval("iqa", "dist", f"{n}.bmp").read_bytes())
            for n in PAIRS]


def rgb(data: bytes) -> np.ndarray:
    import io

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("metric", ["ssim", "ms-ssim", "psnr"])
def test_served_metric_matches_the_official_implementation(metric: str, pairs) -> None:
    score = served(metric)
    measured = [score(reference, distorted) for reference, distorted in pairs]
    for name, got, want in zip(PAIRS, measured, PUBLISHED[metric]):
        assert got == pytest.approx(want, abs=TOLERANCE[metric]), (metric, name, measured)


def test_ms_ssim_on_luma_y_matches_the_official_run_on_ycbcr_input(pairs) -> None:
    """To the 4 published decimals: the residual of the rgb2gray row (up to 0.0044) is not the pyramid's."""
    score = served("ms-ssim", {"channels": "y"})
    measured = [score(reference, distorted) for reference, distorted in pairs]
    assert measured == pytest.approx(PUBLISHED_MS_SSIM_Y, abs=0.00006), measured


def test_rgb_variant_is_scikit_image_per_channel_ssim(pairs) -> None:
    from skimage.metrics import structural_similarity

    score = served("ssim", {"channels": "rgb"})
    for reference, distorted in pairs[:2]:
        expected = structural_similarity(rgb(reference), rgb(distorted), channel_axis=-1, data_range=255,
                                         gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert score(reference, distorted) == pytest.approx(expected, abs=1e-4)
    # The per-channel convention is not the official one: on I04 it is off the table by > 0.05.
    assert abs(score(*pairs[1]) - PUBLISHED["ssim"][1]) > 0.05


def test_y_channel_with_border_crop_is_the_sr_papers_ssim_and_psnr(pairs) -> None:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    def luma(image: np.ndarray) -> np.ndarray:
        image = image.astype(np.float64)
        return 16.0 + (65.481 * image[..., 0] + 128.553 * image[..., 1] + 24.966 * image[..., 2]) / 255.0

    ssim_y = served("ssim", {"channels": "y", "crop_border": 4})
    psnr_y = served("psnr", {"channels": "y", "crop_border": 4})
    reference, distorted = pairs[0]
    a, b = luma(rgb(reference))[4:-4, 4:-4], luma(rgb(distorted))[4:-4, 4:-4]
    expected_ssim = structural_similarity(a, b, data_range=255, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False)
    assert ssim_y(reference, distorted) == pytest.approx(expected_ssim, abs=1e-4)
    assert psnr_y(reference, distorted) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-4)


def test_downsample_option_is_ssim_m_automatic_downsampling(pairs) -> None:
    """512x384: ssim.m's factor is round(384 / 256) = 2, a 2x2 box filter then every 2nd pixel."""
    downsampled = served("ssim", {"downsample": True})
    plain = create_model("hybridserve:ssim").module
    reference, distorted = (torch.from_numpy(rgb(x).copy()).permute(2, 0, 1)[None].float() / 255 for x in pairs[4])
    weights = torch.tensor([0.298936021293775, 0.587043074451121, 0.114020904255103]).view(1, 3, 1, 1)

    def half_gray(x: torch.Tensor) -> torch.Tensor:  # rgb2gray, then 2x2 means (even sides: no border case)
        gray = ((x.double() * weights.double()).sum(1, keepdim=True) * 255).round() / 255
        return F.avg_pool2d(gray, 2).expand(-1, 3, -1, -1)  # 3 equal channels: their mean is the gray score

    expected = float(create_model("hybridserve:ssim", args={"channels": "rgb"}).module(
        half_gray(reference), half_gray(distorted)))
    assert downsampled(*pairs[4]) == pytest.approx(expected, abs=1e-6)
    assert abs(expected - float(plain(reference, distorted))) > 0.05  # the option changes I19 a lot


def test_box_downsample_follows_matlab_on_odd_sides() -> None:
    """imfilter(x, ones(2)/4, 'symmetric', 'same') then x(1:2:end, 1:2:end) on a 3x3 image."""
    x = torch.arange(9, dtype=torch.float64).view(1, 1, 3, 3)
    # Blocks start at the pixel itself; past the edge the edge pixel repeats.
    expected = torch.tensor([[(0 + 1 + 3 + 4) / 4, (2 + 2 + 5 + 5) / 4], [(6 + 7 + 6 + 7) / 4, 8.0]])
    torch.testing.assert_close(box_downsample(x, 2)[0, 0], expected.double())
    # Factor 3 centres the block (MATLAB's centre floor((3 + 1) / 2) = 2).
    y = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)
    assert box_downsample(y, 3).shape == (1, 1, 2, 2)
    assert float(box_downsample(y, 3)[0, 0, 0, 0]) == pytest.approx(float(y[0, 0, [0, 0, 1]][:, [0, 0, 1]].mean()))


@pytest.mark.parametrize("args, message", [({"channels": "bgr"}, "channels"), ({"crop_border": -1}, "crop_border"),
                                           ({"downsample": "auto"}, "downsample")])
def test_bad_arguments_fail_the_load_with_a_reason(args: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_model("hybridserve:ssim", args=args)


def test_crop_border_raises_the_smallest_accepted_size() -> None:
    assert create_model("hybridserve:ms_ssim").module.min_size == 176
    assert create_model("hybridserve:psnr", args={"crop_border": 4}).module.min_size == 9
    assert create_model("hybridserve:ssim", args={"crop_border": 4}).module.min_size == 19


@pytest.mark.parametrize("metric", ["ssim", "psnr"])
def test_full_reference_eval_from_a_csv_ranks_as_the_official_scores(metric: str, tmp_path, capsys) -> None:
    """``hybridserve eval iqa`` on rows of (image, reference, mos), the official scores as the MOS."""
    import json

    from hybridserve.server.cli.main import main

    rows = ["image,reference,mos"] + [
        f"{needs_eval('iqa', 'dist', f'{n}.bmp')},{needs_eval('iqa', 'ref', f'{n}.bmp')},{score}"
        for n, score in zip(PAIRS, PUBLISHED[metric])]
    (tmp_path / "tid2013.csv").write_text("\n".join(rows) + "\n")
    assert main(["eval", "iqa", metric, str(tmp_path / "tid2013.csv"), "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 5 and report["protocol"] == {"kind": "full-reference", "groups": 0}
    assert report["metrics"]["srcc"] == pytest.approx(1.0) and report["metrics"]["krcc"] == pytest.approx(1.0)
    assert report["metrics"]["plcc"] > 0.9999
