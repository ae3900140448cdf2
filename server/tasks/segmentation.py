"""Semantic segmentation: batched class logits, a class index for every pixel.

By default an image is resized to the model's input (``stretch``, ``letterbox`` or ``none``);
the logits, at the model's own stride, are upsampled bilinearly to the part of the input the
image covers (letterbox padding is cut off), and then, with ``segmentation.output_size: input``
(the default), to the sent image's size, before the argmax. A spec with ``segmentation.tiled``
runs the image at its own size instead, in overlapping ``preprocessing.tile`` windows whose
upsampled logits are blended (``tiles.Tiling``) before the argmax.

Answers: the mask as a PNG label image (pixel value = class index) by default over HTTP; as JSON,
the classes present with their pixel counts and the mask as base64 PNG (``format=png``) or each
class's run-length encoding (``format=rle``, COCO's uncompressed RLE); the OIP tensors ``mask``
(``[N, H, W]`` UINT8 class indices), ``mask_encoded`` and ``class_pixels``.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hybridserve_client.schemas import SegmentationResult, SegmentClass
from hybridserve.server.core.errors import InvalidInput
from hybridserve.server.core.images import encode_image, resize_for_model
from hybridserve.server.core.spec import ModelSpec
from hybridserve.server.tasks.base import (
    Binary, Options, Output, Prepared, Task, TaskHandler, TensorSpec, label_of, object_array,
)
from hybridserve.server.tasks.tiles import Tiling


@dataclass(frozen=True)
class Mask:
    """The neutral output: class indices, uint8 (H, W)."""

    array: np.ndarray

    def pixels_per_class(self, classes: int) -> np.ndarray:
        return np.bincount(self.array.reshape(-1), minlength=classes).astype(np.int64)

    def png(self) -> bytes:
        return encode_image(self.array[:, :, None], "png")

    def rle(self, index: int) -> list[int]:
        """COCO's uncompressed RLE of the pixels of class ``index``: run lengths over the mask in
        column-major order, alternately outside and inside the class, starting outside (maybe 0)."""
        inside = (self.array == index).ravel(order="F")
        edges = np.flatnonzero(inside[1:] != inside[:-1]) + 1
        runs = np.diff(np.concatenate(([0], edges, [inside.size])))
        return ([0] if inside[0] else []) + runs.tolist()


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) logits resized bilinearly to ``size`` = (height, width)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)[0]


class SegmentationHandler(TaskHandler):
    task = "segmentation"

    def prepare(self, image: np.ndarray, reference: np.ndarray | None, options: Options) -> Prepared:
        pre, section = self.spec.preprocessing, self.spec.segmentation
        height, width = image.shape[:2]
        if section.tiled:
            tiling = Tiling.of(height, width, pre.tile, pre.tile_overlap)
            return Prepared(items=tiling.cut(self.to_tensor(image)), context={"tiling": tiling})
        resized, placement = resize_for_model(image, pre.input_size, pre.resize)
        # The part of the model's input the image covers (all of it, unless letterboxed).
        seen = (min(pre.input_size[0], round(height * placement.scale_y)),
                min(pre.input_size[1], round(width * placement.scale_x)))
        size = seen if section.output_size == "model" else (height, width)
        return Prepared(items=[self.to_tensor(resized)], context={"seen": seen, "size": size})

    def postprocess(self, prepared: Prepared, outputs: list[Output]) -> Mask:
        context = prepared.context
        if "tiling" in context:
            tiling: Tiling = context["tiling"]
            logits = tiling.blend([upsample(out, (h, w)) for out, (_, _, h, w) in zip(outputs, tiling.boxes)])
        elif context["seen"] == tuple(self.spec.preprocessing.input_size):
            logits = upsample(outputs[0], context["size"])
        else:  # letterboxed: cut the padding off at the model's input size first
            seen_h, seen_w = context["seen"]
            logits = upsample(upsample(outputs[0], self.spec.preprocessing.input_size)[:, :seen_h, :seen_w],
                              context["size"])
        return Mask(logits.argmax(dim=0).to(torch.uint8).numpy())


class SegmentationTask(Task):
    name = "segmentation"
    verb = "segment"
    handler = SegmentationHandler
    result = SegmentationResult
    options = ("format",)
    formats = ("png", "rle")
    binary_types = ("image/png",)
    binary_by_default = True

    def tiles(self, spec: ModelSpec) -> bool:
        return spec.segmentation is not None and spec.segmentation.tiled

    def check(self, spec: ModelSpec) -> None:
        super().check(spec)
        if not 1 <= len(spec.labels) <= 256:
            raise ValueError("a segmentation model needs 1..256 labels (its classes, in the logits' order)")
        if self.tiles(spec) and spec.preprocessing.input_size is not None:
            raise ValueError("segmentation.tiled runs images at their own size: leave preprocessing.input_size unset")
        if spec.preprocessing.resize == "center_crop":
            raise ValueError("a segmentation model's resize is stretch, letterbox or none: center_crop would leave "
                             "the image's edges without labels")

    def typed(self, spec: ModelSpec, output: Mask, options: Options) -> SegmentationResult:
        fmt = options.format or self.formats[0]
        return SegmentationResult(
            model=spec.name, width=output.array.shape[1], height=output.array.shape[0], labels=list(spec.labels),
            classes=self._classes(spec, output, rle=fmt == "rle"), mask_format=fmt,
            mask=base64.b64encode(output.png()).decode("ascii") if fmt == "png" else None,
        )

    def _classes(self, spec: ModelSpec, output: Mask, rle: bool) -> list[SegmentClass]:
        counts = output.pixels_per_class(len(spec.labels))
        total = max(1, int(output.array.size))
        return [SegmentClass(index=int(i), label=label_of(spec, int(i)), pixels=int(counts[i]),
                             fraction=round(int(counts[i]) / total, 6), rle=output.rle(int(i)) if rle else None)
                for i in np.argsort(-counts, kind="stable") if counts[i] > 0]

    def binary(self, spec: ModelSpec, output: Mask, options: Options) -> Binary | None:
        if options.format == "rle":  # run lengths are JSON
            return None
        return Binary(output.png(), "image/png", {"X-Image-Width": str(output.array.shape[1]),
                                                  "X-Image-Height": str(output.array.shape[0])})

    def grpc_message(self, spec: ModelSpec, output: Mask, options: Options, messages):
        fmt = options.format or self.formats[0]
        classes = [messages.SegmentClass(**c.model_dump(exclude_none=True))
                   for c in self._classes(spec, output, rle=fmt == "rle")]
        return messages.SegmentationResult(model=spec.name, width=output.array.shape[1],
                                           height=output.array.shape[0], labels=list(spec.labels),
                                           classes=classes, mask=output.png() if fmt == "png" else b"",
                                           mask_format=fmt)

    def oip_outputs(self, spec: ModelSpec) -> tuple[TensorSpec, ...]:
        pre, section = spec.preprocessing, spec.segmentation
        fixed = (section is not None and section.output_size == "model" and not section.tiled
                 and pre.resize != "letterbox")  # every mask is the model's input size
        height, width = pre.input_size if fixed else (-1, -1)
        return (TensorSpec("mask", "UINT8", (-1, height, width)), TensorSpec("mask_encoded", "BYTES", (-1,), encoded=True),
                TensorSpec("class_pixels", "INT64", (-1, len(spec.labels))))

    def oip_tensors(self, spec: ModelSpec, outputs: list[Mask], wanted: list[str],
                    options: Options) -> dict[str, tuple[str, np.ndarray]]:
        tensors = {"class_pixels": ("INT64", np.stack([o.pixels_per_class(len(spec.labels)) for o in outputs]))}
        if "mask_encoded" in wanted:
            tensors["mask_encoded"] = ("BYTES", object_array([o.png() for o in outputs], (len(outputs),)))
        if "mask" in wanted:
            if len({o.array.shape for o in outputs}) > 1:
                raise InvalidInput("the images have different sizes, which one UINT8 mask tensor cannot hold: "
                                   "request only the outputs 'mask_encoded' and 'class_pixels', or send same-size images")
            tensors["mask"] = ("UINT8", np.stack([o.array for o in outputs]))
        return tensors


TASK = SegmentationTask()
