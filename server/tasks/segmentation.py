"""Semantic segmentation: resize to the model's input, batched logits, a class index for every input pixel.

The model returns logits at its own stride; postprocess upsamples them (bilinear) to the input
image's size and takes the argmax, so the mask is the size of the image that was sent.
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


@dataclass(frozen=True)
class Mask:
    """The neutral output: class indices, uint8 (H, W), the input image's size."""

    array: np.ndarray

    def pixels_per_class(self, classes: int) -> np.ndarray:
        return np.bincount(self.array.reshape(-1), minlength=classes).astype(np.int64)

    def png(self) -> bytes:
        return encode_image(self.array[:, :, None], "png")


class SegmentationHandler(TaskHandler):
    task = "segmentation"

    def prepare(self, image: np.ndarray, reference: np.ndarray | None, options: Options) -> Prepared:
        pre = self.spec.preprocessing
        resized, _ = resize_for_model(image, pre.input_size, pre.resize)
        return Prepared(items=[self.to_tensor(resized)], context={"size": image.shape[:2]})

    def postprocess(self, prepared: Prepared, outputs: list[Output]) -> Mask:
        logits = F.interpolate(outputs[0][None].float(), size=prepared.context["size"], mode="bilinear",
                               align_corners=False)[0]
        return Mask(logits.argmax(dim=0).to(torch.uint8).numpy())


class SegmentationTask(Task):
    name = "segmentation"
    verb = "segment"
    handler = SegmentationHandler
    result = SegmentationResult
    binary_types = ("image/png",)

    def check(self, spec: ModelSpec) -> None:
        super().check(spec)
        if not 1 <= len(spec.labels) <= 256:
            raise ValueError("a segmentation model needs 1..256 labels (its classes, in the logits' order)")

    def typed(self, spec: ModelSpec, output: Mask, options: Options) -> SegmentationResult:
        return SegmentationResult(
            model=spec.name, width=output.array.shape[1], height=output.array.shape[0], labels=list(spec.labels),
            classes=self._classes(spec, output), mask=base64.b64encode(output.png()).decode("ascii"),
        )

    def _classes(self, spec: ModelSpec, output: Mask) -> list[SegmentClass]:
        counts = output.pixels_per_class(len(spec.labels))
        total = max(1, int(output.array.size))
        return [SegmentClass(index=int(i), label=label_of(spec, int(i)), pixels=int(counts[i]),
                             fraction=round(int(counts[i]) / total, 6))
                for i in np.argsort(-counts, kind="stable") if counts[i] > 0]

    def binary(self, spec: ModelSpec, output: Mask, options: Options) -> Binary:
        return Binary(output.png(), "image/png", {"X-Image-Width": str(output.array.shape[1]),
                                                  "X-Image-Height": str(output.array.shape[0])})

    def grpc_message(self, spec: ModelSpec, output: Mask, options: Options, messages):
        classes = [messages.SegmentClass(**c.model_dump()) for c in self._classes(spec, output)]
        return messages.SegmentationResult(model=spec.name, width=output.array.shape[1],
                                           height=output.array.shape[0], labels=list(spec.labels),
                                           classes=classes, mask=output.png())

    def oip_outputs(self, spec: ModelSpec) -> tuple[TensorSpec, ...]:
        return (TensorSpec("mask", "UINT8", (-1, -1, -1)), TensorSpec("mask_encoded", "BYTES", (-1,)),
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
