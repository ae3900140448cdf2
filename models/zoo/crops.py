"""Fixed crops for IQA models that were trained and published on square crops of the image.

Their authors score random crops and average; served models need the same answer every time,
so they score the centre crop, or the centre and the four corners, and average those. An image
whose short side is below the crop size is first upscaled (bilinear) until the crop fits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CROP_COUNTS = (1, 5)


def check_crop_count(count: int) -> int:
    if count not in CROP_COUNTS:
        raise ValueError("crops must be 1 (centre) or 5 (centre and the four corners)")
    return count


def fit_to_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    height, width = x.shape[-2:]
    if min(height, width) >= size:
        return x
    factor = size / min(height, width)
    target = (max(size, round(height * factor)), max(size, round(width * factor)))
    return F.interpolate(x, size=target, mode="bilinear", align_corners=False)


def crop_origins(height: int, width: int, size: int, count: int) -> list[tuple[int, int]]:
    """Top-left corners of the crops: the centre first, then the corners."""
    centre = ((height - size) // 2, (width - size) // 2)
    if count == 1:
        return [centre]
    return [centre, (0, 0), (0, width - size), (height - size, 0), (height - size, width - size)]


def fixed_crops(x: torch.Tensor, size: int, count: int) -> torch.Tensor:
    """(N, C, H, W) → (count * N, C, size, size), crop-major: reshape scores with ``view(count, N)``."""
    x = fit_to_crop(x, size)
    return torch.cat([x[..., top:top + size, left:left + size] for top, left in crop_origins(*x.shape[-2:], size, count)])
