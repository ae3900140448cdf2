"""The handwritten digits data set (scikit-learn's ``load_digits``) as images for the classifier.

A digit is an 8x8 array of ink values 0..16. It becomes an image the one documented way:
an 8x8 grayscale ("L") image whose pixel is ``round(value * 255 / 16)``: white ink on a
black background. Such an image (saved as PNG at 8x8, or drawn any other size the same
way) is what the served classifier expects; the server then stretches it to the spec's
input size with bilinear resampling, scales to [0, 1] and normalises with mean/std.
``preprocess`` does exactly that here, so training sees what serving sees.

The held-out split is fixed: a stratified 25% of the 1797 digits chosen with seed 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

HELD_OUT_FRACTION = 0.25
SPLIT_SEED = 0
CLASS_NAMES = tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class DigitsSplit:
    """Digits as uint8 images (N, 8, 8) with their labels (N,)."""

    images: np.ndarray
    labels: np.ndarray


def digit_image(values: np.ndarray) -> Image.Image:
    """An 8x8 ink array (0..16) as the grayscale image the classifier is served with."""
    pixels = np.clip(np.rint(np.asarray(values, dtype=np.float64) * 255.0 / 16.0), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels.reshape(8, 8), mode="L")


def load_split() -> tuple[DigitsSplit, DigitsSplit]:
    """The fixed (train, held_out) split of scikit-learn's digits, as uint8 images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    pixels = np.stack([np.asarray(digit_image(v)) for v in data.images])
    train_x, test_x, train_y, test_y = train_test_split(
        pixels, data.target, test_size=HELD_OUT_FRACTION, random_state=SPLIT_SEED, stratify=data.target
    )
    return DigitsSplit(train_x, train_y.astype(np.int64)), DigitsSplit(test_x, test_y.astype(np.int64))


def preprocess(
    images: Sequence[Image.Image], input_size: Sequence[int], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Grayscale images -> (N, 1, H, W) normalised tensor, as the server's ``stretch`` policy does."""
    height, width = input_size
    arrays = [np.asarray(img.convert("L").resize((width, height), Image.BILINEAR), dtype=np.float32) for img in images]
    batch = torch.from_numpy(np.stack(arrays) / np.float32(255.0)).unsqueeze(1)
    return (batch - mean[0]) / std[0]


def split_tensors(
    split: DigitsSplit, input_size: Sequence[int], mean: Sequence[float], std: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as (normalised images, labels) tensors."""
    images = [Image.fromarray(pixels, mode="L") for pixels in split.images]
    return preprocess(images, input_size, mean, std), torch.from_numpy(split.labels)
