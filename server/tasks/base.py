"""The task handler contract: per-request preprocess, batched forward, per-item postprocess.

A handler turns one request into one or more *items* (tensors of one image, or one tile),
the batcher groups items of many requests into a batch for ``forward``, and ``postprocess``
turns a request's item outputs back into its typed result. Handlers know nothing of HTTP,
gRPC, Ray or the batch queue.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from hybridserve.models import LoadedModel
from hybridserve.server.core.errors import InvalidInput
from hybridserve.server.core.images import ImageLimits, decode_image
from hybridserve.server.core.spec import ModelSpec

Item = torch.Tensor | tuple[torch.Tensor, ...]
Output = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Options:
    """Per-request knobs; each handler reads the ones of its task."""

    top_k: int | None = None
    score_threshold: float | None = None
    max_detections: int | None = None
    format: str | None = None


@dataclass
class InferenceRequest:
    """One request as the data plane hands it over: encoded bytes or a decoded uint8 HWC array."""

    image: bytes | np.ndarray
    reference: bytes | np.ndarray | None = None
    options: Options = field(default_factory=Options)


@dataclass
class Prepared:
    """A request after preprocess: the items to batch and what postprocess needs to finish it."""

    items: list[Item]
    context: dict[str, Any] = field(default_factory=dict)


class TaskHandler(ABC):
    """Base of the four task handlers. Subclasses implement ``prepare`` and ``postprocess``."""

    task: ClassVar[str]

    def __init__(self, spec: ModelSpec, model: LoadedModel, device: torch.device, limits: ImageLimits | None = None):
        self.spec = spec
        self.loaded = model
        self.module = model.module
        self.device = device
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec.compile.precision]
        self.limits = limits or ImageLimits()
        pre = spec.preprocessing
        channels = 1 if pre.color == "gray" else 3
        # Smallest side the model accepts when it sees the image at its own size (no resize).
        self.min_side = 1 if pre.input_size else int(getattr(self.module, "min_size", model.extra.get("min_size", 1)))
        self.mean = torch.tensor(pre.mean, dtype=torch.float32).view(channels, 1, 1)
        self.std = torch.tensor(pre.std, dtype=torch.float32).view(channels, 1, 1)

    # ------------------------------------------------------------ per request

    def preprocess(self, request: InferenceRequest) -> Prepared:
        image = self.decode(request.image, "image")
        reference = None
        if self.spec.needs_reference:
            if request.reference is None:
                raise InvalidInput(f"model {self.spec.name!r} is full-reference: send a `reference` image too")
            reference = self.decode(request.reference, "reference")
        elif request.reference is not None:
            raise InvalidInput(f"model {self.spec.name!r} is no-reference: do not send a `reference` image")
        if min(image.shape[:2]) < self.min_side:
            raise InvalidInput(f"image is {image.shape[1]}x{image.shape[0]} pixels; model {self.spec.name!r} needs "
                               f"at least {self.min_side} pixels on each side")
        return self.prepare(image, reference, request.options)

    def decode(self, data: bytes | np.ndarray, field_name: str) -> np.ndarray:
        if isinstance(data, np.ndarray):
            return self._check_array(data, field_name)
        return decode_image(data, self.spec.preprocessing.color, self.limits, field_name)

    def _check_array(self, array: np.ndarray, field_name: str) -> np.ndarray:
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise InvalidInput(f"{field_name}: expected a uint8 array [H, W, 3], got {array.dtype} {list(array.shape)}")
        h, w = array.shape[:2]
        if h == 0 or w == 0 or h * w > self.limits.max_pixels:
            raise InvalidInput(f"{field_name}: {w}x{h} pixels is outside 1..{self.limits.max_pixels} pixels")
        array = array[:, :, :3]
        if self.spec.preprocessing.color == "gray" and array.shape[2] == 3:
            luma = array.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            array = luma.round().clip(0, 255).astype(np.uint8)[:, :, None]
        elif self.spec.preprocessing.color == "rgb" and array.shape[2] == 1:
            array = np.repeat(array, 3, axis=2)
        return np.ascontiguousarray(array)

    @abstractmethod
    def prepare(self, image: np.ndarray, reference: np.ndarray | None, options: Options) -> Prepared:
        """Turn decoded uint8 HWC arrays into the items to batch."""

    @abstractmethod
    def postprocess(self, prepared: Prepared, outputs: list[Output]) -> Any:
        """Turn this request's item outputs into its typed result."""

    # ------------------------------------------------------------ batched

    @torch.inference_mode()
    def forward(self, items: list[Item]) -> list[Output]:
        """Run a batch. Items of different shapes (e.g. edge tiles) run as separate sub-batches."""
        outputs: list[Output | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault(_shape_key(item), []).append(index)
        for indices in groups.values():
            batch = _stack([items[i] for i in indices], self.device, self.dtype)
            result = self.run_model(batch)
            for position, index in enumerate(indices):
                outputs[index] = _select(result, position)
        return outputs  # type: ignore[return-value]

    def run_model(self, batch: Item) -> Output:
        if isinstance(batch, tuple):
            return self.module(*batch)
        return self.module(batch)

    def warmup_request(self) -> InferenceRequest:
        """A synthetic request that exercises the whole pipeline (used before a model is ready)."""
        pre = self.spec.preprocessing
        size = pre.input_size or (max(min(pre.tile, 64), self.min_side),) * 2
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)
        reference = image if self.spec.needs_reference else None
        return InferenceRequest(image=image, reference=reference)

    # ------------------------------------------------------------ helpers

    def to_tensor(self, array: np.ndarray, normalize: bool | None = None) -> torch.Tensor:
        if not array.flags.writeable:
            array = array.copy()
        tensor = torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)
        if self.spec.preprocessing.normalize if normalize is None else normalize:
            tensor = (tensor - self.mean) / self.std
        return tensor.contiguous()


def _shape_key(item: Item) -> tuple:
    if isinstance(item, tuple):
        return tuple(tuple(t.shape) for t in item)
    return tuple(item.shape)


def _stack(items: list[Item], device: torch.device, dtype: torch.dtype) -> Item:
    if isinstance(items[0], tuple):
        return tuple(torch.stack(parts).to(device, dtype, non_blocking=True) for parts in zip(*items))
    return torch.stack(items).to(device, dtype, non_blocking=True)


def _select(result: Output, position: int) -> Output:
    if isinstance(result, (tuple, list)):
        return tuple(part[position].detach().float().cpu() for part in result)
    return result[position].detach().float().cpu()
