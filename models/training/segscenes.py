"""Deterministic synthetic segmentation scenes: the detection scenes plus a class per pixel.

``make_segmentation_scene(seed)`` makes, from the same random draws, exactly the scene that
``scenes.make_scene(seed)`` makes (background crop, shapes, colours, placement, noise: see
``scenes``) and, from the same anti-aliased (4x supersampled) shape masks, its class map:
0 for background, then 1 + the shape's class (circle 1, square 2, triangle 3).

A pixel is labelled by majority. Drawing composites every pixel as a weighted sum of the
background and the objects over it: an object's alpha takes that share of the pixel from
whatever lies under it (a later object covers earlier ones). Weights are summed per class
and the class with the largest weight wins; a tie (an edge pixel exactly half covered)
goes to the lower class index, so to the background.

Seeds ``0 <= seed < HELD_OUT_SEED_START`` are for training; ``held_out_segmentation_scenes``
uses the held-out seeds of ``scenes`` (from ``HELD_OUT_SEED_START`` on), which training never
draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hybridserve.models.training import scenes
from hybridserve.models.training.scenes import HELD_OUT_SEED_START, SCENE_SIZE, Scene

CLASS_NAMES = ("background", *scenes.CLASS_NAMES)
PLACEMENT_TRIES = 30  # as scenes.make_scene: an object that finds no place within this many is dropped


@dataclass(frozen=True)
class SegmentationScene:
    """A detection scene and its class map (H, W) int64: 0 background, 1 + the shape's class."""

    scene: Scene
    class_map: np.ndarray


def make_segmentation_scene(seed: int, size: int = SCENE_SIZE) -> SegmentationScene:
    """The scene for ``seed`` (the image of ``scenes.make_scene(seed, size)``) and its class map."""
    rng = np.random.default_rng(seed)
    image = scenes._background(rng, size)
    weights = np.zeros((len(CLASS_NAMES), size, size), dtype=np.float32)
    weights[0] = 1.0
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(scenes.MIN_OBJECTS, scenes.MAX_OBJECTS + 1))):
        label = int(rng.integers(len(scenes.CLASS_NAMES)))
        side = int(rng.integers(scenes.MIN_SIZE, scenes.MAX_SIZE + 1))
        mask, extent = scenes._shape_mask(label, side, rng)
        for _ in range(PLACEMENT_TRIES):
            left, top = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
            box = np.array([left + extent[0], top + extent[1], left + extent[2], top + extent[3]], dtype=np.float32)
            if scenes._overlap_ok(box, boxes):
                break
        else:
            continue
        window = (slice(top, top + side), slice(left, left + side))
        region = image[window]
        colour = scenes._contrasting_colour(rng, region[mask > 0.5])
        image[window] = region * (1 - mask[..., None]) + colour * mask[..., None]
        covered = weights[(slice(None), *window)]
        covered *= 1 - mask
        covered[label + 1] += mask
        boxes.append(box)
        labels.append(label)
    image = image + rng.normal(0, rng.uniform(0, 6), size=image.shape)
    scene = Scene(
        image=np.clip(np.rint(image), 0, 255).astype(np.uint8),
        boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.array(labels, dtype=np.int64),
    )
    return SegmentationScene(scene=scene, class_map=weights.argmax(0).astype(np.int64))


def held_out_segmentation_scenes(count: int) -> list[SegmentationScene]:
    """The first ``count`` held-out scenes (seeds training never uses)."""
    return [make_segmentation_scene(HELD_OUT_SEED_START + index) for index in range(count)]
