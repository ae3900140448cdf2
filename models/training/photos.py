"""The photographs the restoration and IQA models learn from, and the degradations applied to them.

Data: the sample photographs bundled with scikit-image (``skimage.data``), so training needs
no download. The split is fixed by name:

- training: chelsea, rocket, motorcycle (left view of ``stereo_motorcycle``), hubble_deep_field,
  immunohistochemistry, brick, grass, gravel, moon, clock, page, text, cell;
- held out (evaluation only): astronaut, coffee, camera, coins.

Grayscale photographs become RGB by repeating the channel, as the server's
``convert("RGB")`` does. Every image stays uint8 until it is fed to a model, as on the
server: restoration input is the decoded uint8 image scaled to [0, 1]; NR-IQA input is the
uint8 image resized to the spec's input size by the server's own ``resize_for_model`` and
then normalised with the spec's mean and std.

Degradations (all take and return uint8 RGB arrays):

- ``downscale``: bicubic (PIL ``BICUBIC``, antialiased) by an integer factor;
- ``add_noise``: additive white Gaussian noise of ``sigma`` on the 0-255 scale, rounded and
  clipped back to uint8 (what a client can send);
- ``blur``: Gaussian blur with standard deviation ``sigma`` pixels;
- ``jpeg``: a JPEG round trip at a quality 1-100 (PIL, 4:2:0 chroma subsampling);
- ``distort``: one of blur / noise / jpeg at a strength in [0, 1] (0 = untouched), the
  scale the NR-IQA model is trained and evaluated on.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from skimage import data as skdata

TRAIN_PHOTOS = (
    "chelsea", "rocket", "motorcycle", "hubble_deep_field", "immunohistochemistry",
    "brick", "grass", "gravel", "moon", "clock", "page", "text", "cell",
)
HELD_OUT_PHOTOS = ("astronaut", "coffee", "camera", "coins")

DISTORTIONS = ("blur", "noise", "jpeg")
MAX_BLUR_SIGMA = 4.0
MAX_NOISE_SIGMA = 50.0
JPEG_QUALITY_RANGE = (90, 3)


def load_photo(name: str) -> np.ndarray:
    """A scikit-image sample photograph as uint8 RGB (H, W, 3)."""
    image = skdata.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skdata, name)()
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3].astype(np.uint8))


def crop_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """Crop the bottom and right edges so that height and width are multiples of ``multiple``."""
    height, width = image.shape[0] // multiple * multiple, image.shape[1] // multiple * multiple
    return image[:height, :width]


def load_photos(names: Sequence[str], multiple: int = 1) -> list[np.ndarray]:
    return [crop_to_multiple(load_photo(name), multiple) for name in names]


def downscale(image: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic downscaling by ``scale`` (height and width must be multiples of it)."""
    height, width = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((width // scale, height // scale), Image.BICUBIC))


def upscale(image: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic upscaling by ``scale``: the baseline a super-resolution model has to beat."""
    height, width = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((width * scale, height * scale), Image.BICUBIC))


def add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    noisy = image.astype(np.float64) + rng.normal(0.0, sigma, image.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    blurred = gaussian_filter(image.astype(np.float64), sigma=(sigma, sigma, 0), mode="reflect")
    return np.clip(np.round(blurred), 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(buffer).convert("RGB"))


def distort(image: np.ndarray, kind: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Apply distortion ``kind`` at ``strength`` in [0, 1]; 0 returns the image untouched.

    blur: sigma = 4 * strength px; noise: sigma = 50 * strength (0-255 scale); jpeg: quality
    falls geometrically from 90 at strength 0+ to 3 at strength 1.
    """
    if strength <= 0:
        return image
    if kind == "blur":
        return blur(image, MAX_BLUR_SIGMA * strength)
    if kind == "noise":
        return add_noise(image, MAX_NOISE_SIGMA * strength, rng)
    if kind == "jpeg":
        best, worst = JPEG_QUALITY_RANGE
        return jpeg(image, max(1, round(best * (worst / best) ** strength)))
    raise ValueError(f"unknown distortion {kind!r}; known: {', '.join(DISTORTIONS)}")


def to_tensor(images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) or (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    batch = np.asarray(images)
    if batch.ndim == 3:
        batch = batch[None]
    return torch.from_numpy(np.require(batch, requirements=["C", "W"])).permute(0, 3, 1, 2).float().div_(255.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [0, 1] -> uint8 (N, H, W, 3), clamped and rounded."""
    return images.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()


class PairedPatches:
    """Deterministic random aligned patches from (input, target) image pairs.

    ``target`` is ``scale`` times larger than ``input``. Each patch comes from a photo drawn
    uniformly (so a large photo does not dominate), at a random position, with one of the
    eight flips / 90-degree rotations applied to both sides.
    """

    def __init__(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], patch: int, scale: int, seed: int) -> None:
        self.pairs = list(pairs)
        self.patch = patch
        self.scale = scale
        self.rng = np.random.default_rng(seed)

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        inputs, targets = [], []
        for _ in range(size):
            source, target = self.pairs[self.rng.integers(len(self.pairs))]
            top = self.rng.integers(source.shape[0] - self.patch + 1)
            left = self.rng.integers(source.shape[1] - self.patch + 1)
            s, p = self.scale, self.patch
            crops = (source[top:top + p, left:left + p], target[top * s:(top + p) * s, left * s:(left + p) * s])
            turns, flip = self.rng.integers(4), bool(self.rng.integers(2))
            crops = tuple(np.rot90(c[:, ::-1] if flip else c, turns) for c in crops)
            inputs.append(crops[0])
            targets.append(crops[1])
        return np.stack(inputs), np.stack(targets)
