"""Full-reference image quality metrics as weight-free modules: PSNR, SSIM and MS-SSIM.

Every metric takes ``(reference, distorted)``, both float RGB tensors in [0, 1] of shape
``(N, 3, H, W)``, and returns one score per image ``(N,)``; higher is better. Arguments
(``architecture_args`` of a spec) choose the convention:

``channels`` — what the metric is computed on:

- ``gray``: one luma channel as MATLAB's ``rgb2gray`` makes it from an 8-bit image,
  ``round(0.298936 R + 0.587043 G + 0.114021 B)`` on 0-255 values. The official SSIM and
  MS-SSIM code (Wang's ``ssim.m`` and ``msssim.m``) takes a grayscale image; this is the
  input the published calibration of those implementations used. Default of SSIM and MS-SSIM.
- ``y``: BT.601 luma ``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255`` on 0-255 values,
  not rounded: the super-resolution papers' PSNR-Y / SSIM-Y convention.
- ``rgb``: each of the three channels, scores averaged over them (PSNR: one mean squared
  error over all channels). Default of PSNR.

``crop_border`` — pixels dropped at every border before the metric (the SR papers drop
``scale`` pixels). Default 0.

- PSNR: peak 1 (255 on 8-bit values; on ``y``, 255 on the 0-255 luma), capped at 100 dB for
  identical images. On ``rgb`` it equals ``skimage.metrics.peak_signal_noise_ratio``.
- SSIM: Wang, Bovik, Sheikh and Simoncelli, "Image quality assessment: from error
  visibility to structural similarity", IEEE TIP 2004, as its reference code computes it: an
  11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03 (dynamic range 255), population
  covariances, only positions where the window lies inside the image ('valid'), the mean of
  the SSIM map. ``downsample: true`` adds the reference code's automatic downsampling (a
  ``f x f`` box filter with symmetric borders, then every ``f``-th pixel, with
  ``f = max(1, round(min(H, W) / 256))``); the published calibration of the reference code
  removed it, so it is off by default. On ``rgb`` this is what
  ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)`` computes.
- MS-SSIM: Wang, Simoncelli and Bovik, "Multi-scale structural similarity for image
  quality assessment", Asilomar 2003, as its reference code computes it: five scales, each
  the previous one filtered by a 2x2 box filter with symmetric borders and subsampled by 2
  (an odd side keeps its last row or column); the mean contrast-structure term of scales 1-4
  and the mean SSIM of scale 5, raised to the weights 0.0448, 0.2856, 0.3001, 0.2363, 0.1333
  and multiplied. Negative terms are clipped to 0 so that their powers stay real. On
  ``rgb``, per channel, then averaged over the channels.

The computation runs in float64 (differences of squared means lose digits in float32) and
the scores come back in the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
CHANNELS = ("gray", "y", "rgb")
# MATLAB rgb2gray: the first row of the inverse of the NTSC (YIQ) matrix.
RGB2GRAY = (0.298936021293775, 0.587043074451121, 0.114020904255103)
# BT.601 luma on 0-255 values, as the super-resolution papers compute Y.
BT601_Y = (65.481, 128.553, 24.966)
BT601_Y_OFFSET = 16.0


def to_channels(image: torch.Tensor, channels: str) -> torch.Tensor:
    """RGB in [0, 1] ``(N, 3, H, W)`` -> the channels a metric runs on, still on a [0, 1] scale."""
    if channels == "rgb":
        return image
    r, g, b = image.unbind(dim=1)
    if channels == "gray":
        gray = RGB2GRAY[0] * r + RGB2GRAY[1] * g + RGB2GRAY[2] * b
        return (gray * 255.0).round().div(255.0).unsqueeze(1)
    if channels == "y":
        luma = BT601_Y_OFFSET / 255.0 + (BT601_Y[0] * r + BT601_Y[1] * g + BT601_Y[2] * b) / 255.0
        return luma.unsqueeze(1)
    raise ValueError(f"channels must be one of {', '.join(CHANNELS)}, got {channels!r}")


class _FullReferenceMetric(nn.Module):
    """Shared arguments and input handling: channel choice, border crop, float64."""

    higher_is_better = True
    range = (-1.0, 1.0)
    window = 1  # the smallest side the metric needs after the border crop

    def __init__(self, channels: str = "rgb", crop_border: int = 0) -> None:
        super().__init__()
        if channels not in CHANNELS:
            raise ValueError(f"channels must be one of {', '.join(CHANNELS)}, got {channels!r}")
        if int(crop_border) != crop_border or crop_border < 0:
            raise ValueError(f"crop_border must be a whole number of pixels >= 0, got {crop_border!r}")
        self.channels = channels
        self.crop_border = int(crop_border)
        self.min_size = self.window + 2 * self.crop_border  # read by the server to refuse smaller images

    def extra_repr(self) -> str:
        return f"channels={self.channels!r}, crop_border={self.crop_border}"

    def _prepare(self, reference: torch.Tensor, distorted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pair(reference, distorted, self.channels)
        _check_size(reference, self.min_size, type(self).__name__)
        reference, distorted = (to_channels(x.double(), self.channels) for x in (reference, distorted))
        c = self.crop_border
        if c:
            reference, distorted = reference[..., c:-c, c:-c], distorted[..., c:-c, c:-c]
        return reference, distorted


class PSNR(_FullReferenceMetric):
    """Peak signal-to-noise ratio in dB, peak 1 on [0, 1] values."""

    range = (0.0, 100.0)

    def forward(self, reference: torch.Tensor, distorted: torch.Tensor) -> torch.Tensor:
        x, y = self._prepare(reference, distorted)
        mse = (x - y).pow(2).flatten(1).mean(dim=1)
        return (-10.0 * torch.log10(mse)).clamp(max=self.range[1]).to(reference.dtype)


class _GaussianWindowMetric(_FullReferenceMetric):
    """Shared machinery: a separable Gaussian window applied without padding ('valid')."""

    window = SSIM_WINDOW

    def __init__(self, channels: str = "gray", crop_border: int = 0) -> None:
        super().__init__(channels, crop_border)
        offsets = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
        taps = torch.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
        self.register_buffer("taps", taps / taps.sum(), persistent=False)

    def _filter(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        rows = self.taps.to(x.dtype).view(1, 1, SSIM_WINDOW, 1).expand(channels, 1, SSIM_WINDOW, 1)
        cols = self.taps.to(x.dtype).view(1, 1, 1, SSIM_WINDOW).expand(channels, 1, 1, SSIM_WINDOW)
        return F.conv2d(F.conv2d(x, rows, groups=channels), cols, groups=channels)

    def _ssim_terms(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position luminance term and contrast-structure term, data range 1."""
        c1 = SSIM_K1**2
        c2 = SSIM_K2**2
        batch = x.shape[0]
        moments = self._filter(torch.cat([x, y, x * x, y * y, x * y]))
        mu_x, mu_y, xx, yy, xy = moments.split(batch)
        var_x = xx - mu_x * mu_x
        var_y = yy - mu_y * mu_y
        cov = xy - mu_x * mu_y
        luminance = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
        contrast_structure = (2 * cov + c2) / (var_x + var_y + c2)
        return luminance, contrast_structure


class SSIM(_GaussianWindowMetric):
    """Structural similarity (mean of the SSIM map; on ``rgb``, averaged over the channels)."""

    def __init__(self, channels: str = "gray", crop_border: int = 0, downsample: bool = False) -> None:
        super().__init__(channels, crop_border)
        if not isinstance(downsample, bool):
            raise ValueError(f"downsample must be true or false, got {downsample!r}")
        self.downsample = downsample

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, downsample={self.downsample}"

    def forward(self, reference: torch.Tensor, distorted: torch.Tensor) -> torch.Tensor:
        x, y = self._prepare(reference, distorted)
        if self.downsample:
            factor = max(1, int(min(x.shape[-2:]) / 256 + 0.5))  # MATLAB's round: halves away from zero
            if factor > 1:
                x, y = box_downsample(x, factor), box_downsample(y, factor)
        luminance, contrast_structure = self._ssim_terms(x, y)
        return (luminance * contrast_structure).flatten(1).mean(dim=1).to(reference.dtype)


class MSSSIM(_GaussianWindowMetric):
    """Multi-scale structural similarity over five scales."""

    range = (0.0, 1.0)
    window = SSIM_WINDOW * 2 ** (len(MS_SSIM_WEIGHTS) - 1)  # the reference code's size check: 176

    def __init__(self, channels: str = "gray", crop_border: int = 0) -> None:
        super().__init__(channels, crop_border)
        self.register_buffer("weights", torch.tensor(MS_SSIM_WEIGHTS, dtype=torch.float64), persistent=False)

    def forward(self, reference: torch.Tensor, distorted: torch.Tensor) -> torch.Tensor:
        x, y = self._prepare(reference, distorted)
        scales = len(MS_SSIM_WEIGHTS)
        terms = []
        for scale in range(scales):
            luminance, contrast_structure = self._ssim_terms(x, y)
            if scale == scales - 1:
                terms.append((luminance * contrast_structure).flatten(2).mean(dim=2))
            else:
                terms.append(contrast_structure.flatten(2).mean(dim=2))
                x, y = box_downsample(x, 2), box_downsample(y, 2)
        per_scale = torch.stack(terms, dim=-1).clamp(min=0)  # (N, C, scales)
        per_channel = per_scale.pow(self.weights.to(per_scale.dtype)).prod(dim=-1)
        return per_channel.mean(dim=1).to(reference.dtype)


def box_downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """MATLAB's ``imfilter(x, ones(f) / f^2, 'symmetric', 'same')`` followed by ``x(1:f:end, 1:f:end)``.

    MATLAB centres an even filter at ``floor((f + 1) / 2)``, so each output pixel averages
    the ``f x f`` block that starts ``floor((f + 1) / 2) - 1`` pixels above and to the left of
    it; blocks that run past the image read it mirrored (the edge pixel repeated first).
    """
    before = (factor + 1) // 2 - 1
    after = factor - 1 - before
    x = _symmetric_pad(_symmetric_pad(x, before, after, dim=-1), before, after, dim=-2)
    return F.avg_pool2d(x, factor, stride=factor, ceil_mode=False)


def _symmetric_pad(x: torch.Tensor, before: int, after: int, dim: int) -> torch.Tensor:
    parts = []
    if before:
        parts.append(x.narrow(dim, 0, before).flip(dim))
    parts.append(x)
    if after:
        parts.append(x.narrow(dim, x.shape[dim] - after, after).flip(dim))
    return torch.cat(parts, dim=dim) if len(parts) > 1 else x


def _check_pair(reference: torch.Tensor, distorted: torch.Tensor, channels: str) -> None:
    if reference.shape != distorted.shape or reference.dim() != 4:
        raise ValueError(
            f"reference and distorted must be (N, C, H, W) of the same shape, got "
            f"{tuple(reference.shape)} and {tuple(distorted.shape)}"
        )
    if channels != "rgb" and reference.shape[1] != 3:
        raise ValueError(f"channels {channels!r} needs RGB input (N, 3, H, W), got {tuple(reference.shape)}")


def _check_size(image: torch.Tensor, smallest: int, metric: str) -> None:
    if min(image.shape[-2:]) < smallest:
        raise ValueError(
            f"{metric} needs images of at least {smallest}x{smallest} pixels, got {tuple(image.shape[-2:])}"
        )
