"""Restoration (super-resolution, denoising): overlapping tiles, batched, blended without seams.

An image is cut into ``tile`` x ``tile`` tiles that overlap by ``tile_overlap`` pixels
(``tiles.Tiling``); every tile is a batch item, so tiles of different requests share batches,
and the outputs are blended across each overlap. An image no larger than one tile runs whole.
Inputs are reflect-padded to the model's ``pad_multiple`` and the padding is cropped from the output.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hybridserve_client.schemas import RestorationResult
from hybridserve.server.core.errors import InvalidInput
from hybridserve.server.core.images import encode_image
from hybridserve.server.core.spec import ModelSpec
from hybridserve.server.tasks.base import (
    Binary, Options, Output, Prepared, Task, TaskHandler, TensorSpec, object_array,
)
from hybridserve.server.tasks.tiles import Tiling


@dataclass(frozen=True)
class Pixels:
    """The neutral output: the restored image as uint8 (H, W, C); transports encode it."""

    array: np.ndarray

    @property
    def height(self) -> int:
        return self.array.shape[0]

    @property
    def width(self) -> int:
        return self.array.shape[1]

    def encoded(self, options: Options) -> tuple[str, bytes]:
        fmt = options.format or "png"
        return fmt, encode_image(self.array, fmt)


class RestorationHandler(TaskHandler):
    task = "restoration"

    def prepare(self, image: np.ndarray, reference: np.ndarray | None, options: Options) -> Prepared:
        pre = self.spec.preprocessing
        tensor = self.to_tensor(image, normalize=False)
        tiling = Tiling.of(*tensor.shape[1:], pre.tile, pre.tile_overlap)
        return Prepared(items=[self._pad(tile) for tile in tiling.cut(tensor)], context={"tiling": tiling})

    def _pad(self, tile: torch.Tensor) -> torch.Tensor:
        multiple = self.loaded.pad_multiple
        h, w = tile.shape[1:]
        pad_h, pad_w = (-h) % multiple, (-w) % multiple
        if not (pad_h or pad_w):
            return tile
        reflect_h, reflect_w = min(pad_h, h - 1), min(pad_w, w - 1)
        tile = F.pad(tile[None], (0, reflect_w, 0, reflect_h), mode="reflect")
        return F.pad(tile, (0, pad_w - reflect_w, 0, pad_h - reflect_h), mode="replicate")[0]

    def postprocess(self, prepared: Prepared, outputs: list[Output]) -> Pixels:
        merged = prepared.context["tiling"].blend(outputs, self.loaded.scale)
        return Pixels(merged.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy())


class RestorationTask(Task):
    name = "restoration"
    verb = "restore"
    handler = RestorationHandler
    result = RestorationResult
    binary_types = ("image/png", "image/jpeg", "image/webp")
    binary_by_default = True
    options = ("format",)
    formats = ("png", "jpeg", "webp")
    tiled = True

    def check(self, spec: ModelSpec) -> None:
        if spec.restoration is None:
            raise ValueError("a restoration model needs a restoration section")

    def output_scale(self, spec: ModelSpec) -> int | None:
        return spec.architecture_args.get("scale")

    def typed(self, spec: ModelSpec, output: Pixels, options: Options) -> RestorationResult:
        fmt, data = output.encoded(options)
        return RestorationResult(model=spec.name, width=output.width, height=output.height, format=fmt,
                                 image=base64.b64encode(data).decode("ascii"))

    def binary(self, spec: ModelSpec, output: Pixels, options: Options) -> Binary:
        fmt, data = output.encoded(options)
        return Binary(data, f"image/{fmt}", {"X-Image-Width": str(output.width), "X-Image-Height": str(output.height)})

    def grpc_message(self, spec: ModelSpec, output: Pixels, options: Options, messages):
        fmt, data = output.encoded(options)
        return messages.RestorationResult(model=spec.name, width=output.width, height=output.height, format=fmt,
                                          image=data)

    def oip_outputs(self, spec: ModelSpec) -> tuple[TensorSpec, ...]:
        channels = 1 if spec.preprocessing.color == "gray" else 3
        return (TensorSpec("restored_image", "UINT8", (-1, -1, -1, channels)),
                TensorSpec("restored_encoded", "BYTES", (-1,), encoded=True))

    def oip_tensors(self, spec: ModelSpec, outputs: list[Pixels], wanted: list[str],
                    options: Options) -> dict[str, tuple[str, np.ndarray]]:
        tensors = {}
        if "restored_encoded" in wanted:
            encoded = [output.encoded(options)[1] for output in outputs]
            tensors["restored_encoded"] = ("BYTES", object_array(encoded, (len(outputs),)))
        if "restored_image" in wanted:
            if len({output.array.shape for output in outputs}) > 1:
                raise InvalidInput(
                    "the images restore to different sizes, which one UINT8 tensor cannot hold: request only the "
                    "output 'restored_encoded', or send same-size images"
                )
            tensors["restored_image"] = ("UINT8", np.stack([output.array for output in outputs]))
        return tensors


TASK = RestorationTask()
