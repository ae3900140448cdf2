"""Deterministic synthetic detection scenes: coloured shapes over crops of sample photographs.

``make_scene(seed)`` always returns the same scene for the same seed: a square RGB image
(``SCENE_SIZE`` pixels, the detector's input size, so serving's resize is the identity)
holding 1 to 8 objects of three classes (circle, square, triangle) from 12 to 48 pixels,
with ground-truth boxes (xyxy, pixels) and labels.

- Backgrounds are random crops (random scale, flip, brightness/contrast and colour tint)
  of the photographs bundled with scikit-image (``skimage.data``: astronaut, coffee,
  coins, brick, gravel, text, ...).
- Objects are filled with a random colour that differs from the background under them,
  drawn anti-aliased (4x supersampled masks). Triangles point in any direction.
- Objects may overlap, but at most ``MAX_OVERLAP`` of the smaller box lies inside another
  box, so every object stays mostly visible (its box is its full, unoccluded extent).
- Mild Gaussian pixel noise is added at the end.

Seeds ``0 <= seed < HELD_OUT_SEED_START`` are for training; ``held_out_scenes`` uses seeds
from ``HELD_OUT_SEED_START`` on, which training never draws.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

SCENE_SIZE = 128
CLASS_NAMES = ("circle", "square", "triangle")
MIN_OBJECTS, MAX_OBJECTS = 1, 8
MIN_SIZE, MAX_SIZE = 12, 48
MAX_OVERLAP = 0.3
HELD_OUT_SEED_START = 1_000_000_000
SUPERSAMPLE = 4
MIN_COLOUR_DISTANCE = 90.0
BACKGROUND_PHOTOS = (
    "astronaut", "camera", "chelsea", "coffee", "coins", "moon", "text", "brick", "grass", "gravel",
    "rocket", "hubble_deep_field", "retina", "immunohistochemistry", "page", "cell", "colorwheel", "clock",
)  # fmt: skip


@dataclass(frozen=True)
class Scene:
    """An RGB image (H, W, 3) uint8, boxes (M, 4) float32 xyxy in pixels, labels (M,) int64."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray


@functools.cache
def background_photos() -> tuple[np.ndarray, ...]:
    """The scikit-image sample photographs as RGB uint8 arrays."""
    import skimage.data

    photos = []
    for name in BACKGROUND_PHOTOS:
        pixels = np.asarray(getattr(skimage.data, name)())
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[..., None], 3, axis=2)
        photos.append(np.ascontiguousarray(pixels[..., :3].astype(np.uint8)))
    return tuple(photos)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    photos = background_photos()
    photo = photos[rng.integers(len(photos))]
    height, width = photo.shape[:2]
    side = int(rng.integers(min(64, height, width), min(height, width) + 1))
    top, left = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
    crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
    pixels = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    tint = rng.uniform(0.7, 1.3, size=3).astype(np.float32)
    contrast, brightness = rng.uniform(0.6, 1.2), rng.uniform(-40, 40)
    pixels = (pixels - 128.0) * contrast + 128.0 + brightness
    return np.clip(pixels * tint, 0, 255)


def _shape_mask(label: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, tuple[float, ...]]:
    """An anti-aliased alpha mask (size x size, float in [0, 1]) and the shape's tight box in it."""
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    if CLASS_NAMES[label] == "circle":
        draw.ellipse((0, 0, big - 1, big - 1), fill=255)
        extent = (0.0, 0.0, float(size), float(size))
    elif CLASS_NAMES[label] == "square":
        draw.rectangle((0, 0, big - 1, big - 1), fill=255)
        extent = (0.0, 0.0, float(size), float(size))
    else:
        angle = rng.uniform(0, 2 * np.pi)
        corners = angle + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])
        xs, ys = np.cos(corners), np.sin(corners)
        # Scale the triangle so its bounding box fills the mask's longer side.
        span = max(xs.max() - xs.min(), ys.max() - ys.min())
        xs = (xs - xs.min()) / span * (big - 1)
        ys = (ys - ys.min()) / span * (big - 1)
        draw.polygon(list(zip(xs.tolist(), ys.tolist())), fill=255)
        extent = tuple(float(v) / SUPERSAMPLE for v in (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    mask = canvas.resize((size, size), Image.BOX)
    return np.asarray(mask, dtype=np.float32) / 255.0, extent


def _overlap_ok(box: np.ndarray, placed: list[np.ndarray]) -> bool:
    for other in placed:
        inter_w = min(box[2], other[2]) - max(box[0], other[0])
        inter_h = min(box[3], other[3]) - max(box[1], other[1])
        if inter_w <= 0 or inter_h <= 0:
            continue
        smaller = min((box[2] - box[0]) * (box[3] - box[1]), (other[2] - other[0]) * (other[3] - other[1]))
        if inter_w * inter_h > MAX_OVERLAP * smaller:
            return False
    return True


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour at least MIN_COLOUR_DISTANCE (RGB) from the mean colour under the object."""
    mean = under.reshape(-1, 3).mean(0)
    colour = rng.uniform(0, 255, size=3)
    for _ in range(20):
        if np.linalg.norm(colour - mean) >= MIN_COLOUR_DISTANCE:
            break
        colour = rng.uniform(0, 255, size=3)
    else:
        colour = np.where(mean > 127, 0.0, 255.0)
    return colour.astype(np.float32)


def make_scene(seed: int, size: int = SCENE_SIZE) -> Scene:
    """The scene for ``seed``: always the same image, boxes and labels."""
    rng = np.random.default_rng(seed)
    image = _background(rng, size)
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))):
        label = int(rng.integers(len(CLASS_NAMES)))
        side = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
        mask, extent = _shape_mask(label, side, rng)
        for _ in range(30):
            left, top = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
            box = np.array([left + extent[0], top + extent[1], left + extent[2], top + extent[3]], dtype=np.float32)
            if _overlap_ok(box, boxes):
                break
        else:
            continue
        region = image[top : top + side, left : left + side]
        colour = _contrasting_colour(rng, region[mask > 0.5])
        alpha = mask[..., None]
        image[top : top + side, left : left + side] = region * (1 - alpha) + colour * alpha
        boxes.append(box)
        labels.append(label)
    image = image + rng.normal(0, rng.uniform(0, 6), size=image.shape)
    return Scene(
        image=np.clip(np.rint(image), 0, 255).astype(np.uint8),
        boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.array(labels, dtype=np.int64),
    )


def held_out_scenes(count: int) -> list[Scene]:
    """The first ``count`` held-out scenes (seeds training never uses)."""
    return [make_scene(HELD_OUT_SEED_START + index) for index in range(count)]


def scene_batch(scenes: Sequence[Scene], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Scenes -> normalised (N, 3, H, W) tensor, as the server prepares an image of the input size."""
    pixels = torch.from_numpy(np.stack([scene.image for scene in scenes])).permute(0, 3, 1, 2).float() / 255.0
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
