"""What a task is: its handler (preprocess, batched forward, postprocess) and its ``Task`` declaration.

A handler turns one request into one or more *items* (tensors of one image, or one tile),
the batcher groups items of many requests into a batch for ``forward``, and ``postprocess``
turns a request's item outputs into a *neutral* output (arrays, boxes, pixels, a score).
Handlers know nothing of HTTP, gRPC, Ray, the batch queue or any encoding.

A ``Task`` declares everything else about the task once: its name and verb, the spec checks,
the typed result (the client's schema), the Open Inference Protocol tensors and the typed-gRPC
mapping. The transports iterate over ``hybridserve.server.tasks.TASKS`` and never name a task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from google.protobuf import json_format
from pydantic import BaseModel

from hybridserve.models import LoadedModel
from hybridserve.server.core.errors import InvalidInput
from hybridserve.server.core.images import ImageLimits, decode_image, header_pixels
from hybridserve.server.core.spec import ModelSpec

Item = torch.Tensor | tuple[torch.Tensor, ...]
Output = torch.Tensor | tuple[torch.Tensor, ...]
OPTION_FIELDS = ("top_k", "score_threshold", "max_detections", "format")
# Up to this many pixels in and out, preprocess (a fraction of a millisecond) costs less than a
# hand-off to a worker thread and back; larger requests leave the event loop.
INLINE_PIXELS = 128 * 128
INLINE_BYTES = 64 * 1024


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
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                      "int8": torch.float32}[spec.compile.precision]  # int8 models take fp32 inputs
        self.limits = limits or ImageLimits()
        pre = spec.preprocessing
        channels = 1 if pre.color == "gray" else 3
        # Smallest side the model accepts when it sees the image at its own size (no resize).
        self.min_side = 1 if pre.input_size else int(getattr(self.module, "min_size", model.extra.get("min_size", 1)))
        # The model input's pixels (the image's own size where the model takes any: bounded by the image).
        self.input_pixels = pre.input_size[0] * pre.input_size[1] if pre.input_size else 0
        self.mean = torch.tensor(pre.mean, dtype=torch.float32).view(channels, 1, 1)
        self.std = torch.tensor(pre.std, dtype=torch.float32).view(channels, 1, 1)

    # ------------------------------------------------------------ per request

    def preprocess_inline(self, request: InferenceRequest) -> bool:
        """Whether ``preprocess`` is cheap enough for the event loop: one small image (read from its
        header) into a small model input."""
        if request.reference is not None or self.input_pixels > 4 * INLINE_PIXELS:
            return False
        data = request.image
        if isinstance(data, np.ndarray):
            pixels = data.shape[0] * data.shape[1] if data.ndim == 3 else None
        else:
            pixels = header_pixels(data) if len(data) <= INLINE_BYTES else None
        return pixels is not None and pixels <= INLINE_PIXELS

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
        if h == 0 or w == 0:
            raise InvalidInput(f"{field_name}: an image of {w}x{h} pixels has no pixels")
        self.limits.check(w, h, field_name)
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
        """Turn this request's item outputs into its neutral output (see the task's ``Task``)."""

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
            result = _to_host(self.batch_outputs(self.run_model(batch)))
            for position, index in enumerate(indices):
                outputs[index] = _select(result, position)
        return outputs  # type: ignore[return-value]

    def batch_outputs(self, result: Output) -> Output:
        """Work done once per batch, on the batch's thread, before the batch is split per item
        (e.g. classification's softmax); the rest of ``postprocess`` is per request."""
        return result

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


def _to_host(result: Output) -> Output:
    """A batch's outputs as float32 on the CPU: one transfer per batch, not one per item."""
    if isinstance(result, (tuple, list)):
        return tuple(part.detach().float().cpu() for part in result)
    return result.detach().float().cpu()


def _select(result: Output, position: int) -> Output:
    if isinstance(result, tuple):
        return tuple(part[position] for part in result)
    return result[position]


@dataclass(frozen=True)
class TensorSpec:
    """One Open Inference Protocol tensor of a model's metadata; -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    encoded: bool = False  # BYTES elements are binary files (images): base64 strings in JSON


@dataclass(frozen=True)
class Binary:
    """A result sent as bytes (an image) rather than JSON, when the client does not ask for JSON."""

    data: bytes
    media_type: str
    headers: dict[str, str] = field(default_factory=dict)


class Task:
    """The declaration of one task; each task module defines a subclass and ``TASK``, its instance.

    ``output`` below is what the task's handler's ``postprocess`` returns; ``options`` the
    request's ``Options``. Defaults cover the common case; a task overrides what differs.
    """

    name: ClassVar[str]
    verb: ClassVar[str]
    handler: ClassVar[type[TaskHandler]]
    result: ClassVar[type[BaseModel]]  # the typed result (a client schema); also names the proto message
    options: ClassVar[tuple[str, ...]] = ()  # the ``Options`` fields the task reads
    formats: ClassVar[tuple[str, ...]] = ()  # the values its ``format`` option takes, the default first
    tiled: ClassVar[bool] = False  # serves any image size in tiles (no fixed input size)
    binary_types: ClassVar[tuple[str, ...]] = ()  # media types ``binary`` can answer with over HTTP
    binary_by_default: ClassVar[bool] = False  # bytes unless JSON is asked for; else bytes only when asked

    def check(self, spec: ModelSpec) -> None:
        """Raise ``ValueError`` where ``spec`` does not fit the task."""
        if not self.tiles(spec) and spec.preprocessing.input_size is None:
            raise ValueError(f"a {self.name} model needs preprocessing.input_size")

    def check_options(self, options: Options) -> None:
        """Raise ``InvalidInput`` where a request's options do not fit the task (the data plane asks)."""
        if options.format is not None and options.format not in self.formats:
            accepted = f"one of {', '.join(self.formats)}" if self.formats else "no format option"
            raise InvalidInput(f"format {options.format!r}: {self.name} takes {accepted}")

    def tiles(self, spec: ModelSpec) -> bool:
        """Whether ``spec``'s model runs images of any size in overlapping tiles (``preprocessing.tile``)."""
        return self.tiled

    def output_scale(self, spec: ModelSpec) -> int | None:
        """Output size / input size, for tasks whose output is an image of its own size (metadata)."""
        return None

    def typed(self, spec: ModelSpec, output: Any, options: Options) -> BaseModel:
        """The typed result (JSON over HTTP, the proto mirror over gRPC)."""
        raise NotImplementedError

    def binary(self, spec: ModelSpec, output: Any, options: Options) -> Binary | None:
        """The result as bytes for HTTP clients that do not ask for JSON; None: always JSON."""
        return None

    def grpc_options(self, request: Any) -> dict[str, Any]:
        """Option values of a typed-gRPC request (its optional fields named like the options)."""
        return {name: getattr(request, name) for name in self.options if request.HasField(name)}

    def grpc_message(self, spec: ModelSpec, output: Any, options: Options, messages: Any) -> Any:
        """The typed-gRPC response: by default the typed result's proto mirror (same field names)."""
        typed = self.typed(spec, output, options)
        return json_format.ParseDict(typed.model_dump(mode="json"), getattr(messages, self.result.__name__)())

    @property
    def grpc_method(self) -> str:
        return self.verb.capitalize()

    def oip_outputs(self, spec: ModelSpec) -> tuple[TensorSpec, ...]:
        raise NotImplementedError

    def oip_tensors(self, spec: ModelSpec, outputs: list[Any], wanted: list[str],
                    options: Options) -> dict[str, tuple[str, np.ndarray]]:
        """Output tensors of a batch of images, as ``name -> (datatype, array)`` with N first."""
        raise NotImplementedError


def label_of(spec: ModelSpec, index: int) -> str:
    return spec.labels[index] if 0 <= index < len(spec.labels) else str(index)


def object_array(elements: list, shape: tuple[int, ...] | list[int]) -> np.ndarray:
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array.reshape(shape)
