"""Full-reference image quality metrics as weight-free modules: PSNR, SSIM and MS-SSIM.

Every metric takes ``(reference, distorted)``, both float RGB tensors in [0, 1] of shape
``(N, 3, H, W)``, and returns one score per image ``(N,)``; higher is better.

- PSNR: over all pixels and channels, peak 1 (equivalent to 255 on 8-bit images),
  capped at 100 dB for identical images.
- SSIM: Wang, Bovik, Sheikh and Simoncelli, "Image quality assessment: from error
  visibility to structural similarity", IEEE TIP 2004. An 11x11 Gaussian window with
  sigma 1.5, K1 = 0.01, K2 = 0.03, population (not sample) covariances, only positions
  where the window lies inside the image, computed per channel and averaged; this is
  what ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)`` computes.
- MS-SSIM: Wang, Simoncelli and Bovik, "Multi-scale structural similarity for image
  quality assessment", Asilomar 2003. Five scales separated by 2x2 average pooling; the
  contrast-structure term of scales 1-4 and the full SSIM of scale 5, raised to the
  standard exponents and multiplied, per channel, then averaged over the channels
  (as SSIM is); negative terms are clipped to 0 so that their powers stay real.
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


class PSNR(nn.Module):
    """Peak signal-to-noise ratio in dB on RGB values in [0, 1]."""

    higher_is_better = True
    range = (0.0, 100.0)

    def forward(self, reference: torch.Tensor, distorted: torch.Tensor) -> torch.Tensor:
        _check_pair(reference, distorted)
        mse = (reference - distorted).pow(2).flatten(1).mean(dim=1)
        return (-10.0 * torch.log10(mse)).clamp(max=self.range[1])


class _GaussianWindowMetric(nn.Module):
    """Shared machinery: a separable Gaussian window applied without padding."""

    higher_is_better = True
    range = (-1.0, 1.0)

    def __init__(self) -> None:
        super().__init__()
        offsets = torch.arange(SSIM_WINDOW, dtype=torch.float32) - (SSIM_WINDOW - 1) / 2
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
    """Structural similarity, averaged over the three channels."""

    def forward(self, reference: torch.Tensor, distorted: torch.Tensor) -> torch.Tensor:
        _check_pair(reference, distorted)
        _check_size(reference, SSIM_WINDOW, "SSIM")
        luminance, contrast_structure = self._ssim_terms(reference, distorted)
        return (luminance * contrast_structure).flatten(1).mean(dim=1)


class MSSSIM(_GaussianWindowMetric):
    """Multi-scale structural similarity over five scales."""

    range = (0.0, 1.0)
    min_size = SSIM_WINDOW * 2 ** (len(MS_SSIM_WEIGHTS) - 1)  # read by the server to refuse smaller images

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weights", torch.tensor(MS_SSIM_WEIGHTS), persistent=False)

    def forward(self, reference: torch.Tensor, distorted: torch.Tensor) -> torch.Tensor:
        _check_pair(reference, distorted)
        scales = len(MS_SSIM_WEIGHTS)
        _check_size(reference, SSIM_WINDOW * 2 ** (scales - 1), "MS-SSIM")
        terms = []
        for scale in range(scales):
            luminance, contrast_structure = self._ssim_terms(reference, distorted)
            if scale == scales - 1:
                terms.append((luminance * contrast_structure).flatten(2).mean(dim=2))
            else:
                terms.append(contrast_structure.flatten(2).mean(dim=2))
                reference = F.avg_pool2d(reference, 2)
                distorted = F.avg_pool2d(distorted, 2)
        per_scale = torch.stack(terms, dim=-1).clamp(min=0)  # (N, C, scales)
        per_channel = per_scale.pow(self.weights.to(per_scale.dtype)).prod(dim=-1)
        return per_channel.mean(dim=1)


def _check_pair(reference: torch.Tensor, distorted: torch.Tensor) -> None:
    if reference.shape != distorted.shape or reference.dim() != 4:
        raise ValueError(
            f"reference and distorted must be (N, C, H, W) of the same shape, got "
            f"{tuple(reference.shape)} and {tuple(distorted.shape)}"
        )


def _check_size(image: torch.Tensor, smallest: int, metric: str) -> None:
    if min(image.shape[-2:]) < smallest:
        raise ValueError(f"{metric} needs images of at least {smallest}x{smallest} pixels, got {tuple(image.shape[-2:])}")

