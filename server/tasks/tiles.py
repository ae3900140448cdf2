"""Overlapping tiles: an image cut into batch items, and the items' outputs blended back without seams.

An image is cut into ``tile`` x ``tile`` windows that overlap by ``overlap`` pixels (an image no
larger than one tile is one window, of its own size). Every window is a batch item, so windows
of different requests share batches. Outputs are blended with weights that ramp linearly across
each overlap (the image border keeps full weight), which removes seams. Restoration blends
pixels at its scale; segmentation blends class logits at the image's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering ``length``; every tile is full size when length >= tile."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def ramp(length: int, before: int, after: int) -> torch.Tensor:
    """1-D blending weights: rise over ``before`` pixels, fall over ``after``, 1 in between."""
    position = torch.arange(length, dtype=torch.float32) + 0.5
    weight = torch.ones(length)
    if before:
        weight = torch.minimum(weight, position / before)
    if after:
        weight = torch.minimum(weight, (length - position) / after)
    return weight.clamp_(min=1e-3)


@dataclass(frozen=True)
class Tiling:
    """The windows of one ``height`` x ``width`` image: their starts on each axis, size and overlap."""

    height: int
    width: int
    tile: int
    overlap: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @classmethod
    def of(cls, height: int, width: int, tile: int, overlap: int) -> Tiling:
        return cls(height, width, tile, overlap, tuple(tile_starts(height, tile, overlap)),
                   tuple(tile_starts(width, tile, overlap)))

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        """(y, x, h, w) of every window, row by row."""
        h, w = min(self.tile, self.height), min(self.tile, self.width)
        return [(y, x, h, w) for y in self.ys for x in self.xs]

    def cut(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The windows of a (C, H, W) tensor."""
        return [image[:, y:y + h, x:x + w] for y, x, h, w in self.boxes]

    def blend(self, outputs: list[torch.Tensor], scale: int = 1) -> torch.Tensor:
        """One (C, H * scale, W * scale) tensor from the windows' outputs (each at least its window's size
        times ``scale``; anything beyond, such as padding, is cropped)."""
        height, width = self.height * scale, self.width * scale
        if len(outputs) == 1:
            return outputs[0][:, :height, :width]
        merged = torch.zeros(outputs[0].shape[0], height, width)
        total = torch.zeros(1, height, width)
        overlap = self.overlap * scale
        for (y, x, h, w), out in zip(self.boxes, outputs):
            h, w = h * scale, w * scale
            # Ramp only on sides that touch another tile; the image border keeps full weight.
            wy = ramp(h, overlap if y != self.ys[0] else 0, overlap if y != self.ys[-1] else 0)
            wx = ramp(w, overlap if x != self.xs[0] else 0, overlap if x != self.xs[-1] else 0)
            weight = wy[:, None] * wx[None, :]
            y, x = y * scale, x * scale
            merged[:, y:y + h, x:x + w] += out[:, :h, :w] * weight
            total[:, y:y + h, x:x + w] += weight
        return merged / total
