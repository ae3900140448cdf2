"""The Open Inference Protocol (KServe v2), independent of transport: tensors, metadata, inference.

The HTTP adapter (``oip_http``) and the gRPC adapter (``grpc_services``) only translate their wire
format to ``Tensor``/``InferCall`` and back; everything else is here. Each model declares its
tensors by task (see ``model_metadata``):

* inputs: ``image`` (BYTES ``[N]`` or ``[N, 1]``: encoded JPEG/PNG/... files, base64 strings in
  JSON) or ``image_pixels`` (UINT8 ``[N, H, W, 3]``); full-reference IQA models also take
  ``reference`` or ``reference_pixels`` of the same forms.
* outputs: declared by each task (``Task.oip_outputs``; docs/protocols.md lists them), built from
  the neutral outputs of a batch of images by ``Task.oip_tensors``.

Request parameters ``top_k``, ``score_threshold``, ``max_detections`` and ``format`` map to the task
options, ``timeout`` (microseconds, as tritonclient sends it) to the deadline. Each of the N images
becomes its own data-plane request, so the images join the model's dynamic batch like separate
requests do.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import ValidationError

from hybridserve_client.schemas import ImageRequest
from hybridserve.server.observability import metrics
from hybridserve.server.engine.dataplane import DataPlane
from hybridserve.server.core.errors import InvalidInput, ModelNotFound
from hybridserve.server.core.spec import ModelSpec
from hybridserve.server.tasks import TASKS, InferenceRequest, Options, TensorSpec
from hybridserve.server.tasks.base import OPTION_FIELDS, object_array

SERVER_NAME = "hybridserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("binary_tensor_data", "parameters")
MODEL_VERSION = "1"
MAX_IMAGES_PER_REQUEST = 256

NUMERIC_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPES = (*NUMERIC_DTYPES, "BYTES")


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass
class Tensor:
    """A tensor as it travels: numeric data as a numpy array, BYTES as an object array of bytes."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray
    encoded: bool = False  # BYTES elements that are binary files (images): base64 strings in JSON


@dataclass
class InferCall:
    model: str
    version: str = ""
    id: str = ""
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[str] | None = None  # None: every output of the model
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferAnswer:
    model: str
    version: str
    id: str
    outputs: list[Tensor]


# ------------------------------------------------------------------ metadata


def _image_inputs(prefix: str) -> tuple[TensorSpec, ...]:
    return TensorSpec(prefix, "BYTES", (-1,), encoded=True), TensorSpec(f"{prefix}_pixels", "UINT8", (-1, -1, -1, 3))


def model_metadata(spec: ModelSpec) -> ModelMetadata:
    inputs = _image_inputs("image") + (_image_inputs("reference") if spec.needs_reference else ())
    outputs = TASKS[spec.task].oip_outputs(spec)
    return ModelMetadata(spec.name, (MODEL_VERSION,), f"hybridserve-{spec.task}", inputs, outputs)


def check_version(spec: ModelSpec, version: str) -> None:
    if version not in ("", MODEL_VERSION):
        raise ModelNotFound(f"model {spec.name!r} has no version {version!r}; its only version is {MODEL_VERSION!r}")


# ------------------------------------------------------------------ tensors


def element_count(name: str, shape: Sequence[int]) -> int:
    if any(dim < 0 for dim in shape):
        raise InvalidInput(f"input {name!r}: shape {list(shape)} has a negative dimension")
    return math.prod(shape)


def _check_datatype(name: str, datatype: str) -> None:
    if datatype not in DATATYPES:
        raise InvalidInput(f"input {name!r}: unknown datatype {datatype!r}; OIP datatypes are {', '.join(DATATYPES)}")


def tensor_from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> Tensor:
    """A tensor from its raw bytes (binary extension, ``raw_input_contents``)."""
    _check_datatype(name, datatype)
    count = element_count(name, shape)
    if datatype == "BYTES":
        elements = _split_bytes(name, raw)
        if len(elements) != count:
            raise InvalidInput(f"input {name!r}: shape {list(shape)} needs {count} BYTES elements, got {len(elements)}")
        return Tensor(name, datatype, list(shape), object_array(elements, shape))
    dtype = NUMERIC_DTYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(
            f"input {name!r}: {datatype} {list(shape)} needs {count * dtype.itemsize} bytes, got {len(raw)}"
        )
    return Tensor(name, datatype, list(shape), np.frombuffer(raw, dtype=dtype).reshape(shape))


def tensor_from_values(name: str, datatype: str, shape: Sequence[int], values: Any) -> Tensor:
    """A tensor from listed values (JSON ``data``, gRPC typed ``contents``), flat or nested row-major."""
    _check_datatype(name, datatype)
    count = element_count(name, shape)
    if datatype == "BYTES":
        elements = list(_flatten(values))
        if not all(isinstance(e, (bytes, str)) for e in elements):
            raise InvalidInput(f"input {name!r}: BYTES elements must be strings")
        array = object_array(elements, (len(elements),))
    else:
        try:
            array = np.asarray(values, dtype=NUMERIC_DTYPES[datatype]).reshape(-1)
        except (ValueError, TypeError, OverflowError) as exc:
            raise InvalidInput(f"input {name!r}: data is not a regular array of {datatype} ({exc})") from None
    if array.size != count:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} needs {count} elements, got {array.size}")
    return Tensor(name, datatype, list(shape), array.reshape(shape))


def tensor_to_raw(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(e)) + e for e in tensor.data.reshape(-1))
    return np.ascontiguousarray(tensor.data, dtype=NUMERIC_DTYPES[tensor.datatype]).tobytes()


def tensor_to_json(tensor: Tensor) -> list:
    """Flat row-major values for JSON: BYTES as text, or base64 for encoded images."""
    if tensor.datatype != "BYTES":
        return tensor.data.reshape(-1).tolist()
    if tensor.encoded:
        return [base64.b64encode(e).decode("ascii") for e in tensor.data.reshape(-1)]
    return [e.decode("utf-8", errors="replace") for e in tensor.data.reshape(-1)]


def _split_bytes(name: str, raw: bytes) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"input {name!r}: BYTES data ends inside a 4-byte length prefix")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            left = len(raw) - offset
            raise InvalidInput(f"input {name!r}: a BYTES element claims {size} bytes but only {left} remain")
        elements.append(raw[offset:offset + size])
        offset += size
    return elements


def _flatten(values: Any):
    if isinstance(values, (list, tuple)):
        for value in values:
            yield from _flatten(value)
    else:
        yield values


# ------------------------------------------------------------------ parameters


def options_from(values: Mapping[str, Any]) -> Options:
    """Task options from request parameters, validated by the same rules as the typed HTTP API."""
    given = {key: values[key] for key in OPTION_FIELDS if values.get(key) is not None}
    try:
        checked = ImageRequest.model_validate({"image": "", **given})
    except ValidationError as exc:
        raise InvalidInput("; ".join(f"parameter {e['loc'][0]!r}: {e['msg']}" for e in exc.errors()[:5])) from None
    return Options(checked.top_k, checked.score_threshold, checked.max_detections, checked.format)


def timeout_from(parameters: Mapping[str, Any], default_s: float) -> float:
    """The ``timeout`` parameter (microseconds, as tritonclient sends it), else the default."""
    value = parameters.get("timeout")
    if value is None:
        return default_s
    try:
        micros = int(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"parameter 'timeout': {value!r} is not a number of microseconds") from None
    if micros <= 0:
        raise InvalidInput("parameter 'timeout': must be a positive number of microseconds")
    return min(micros / 1e6, default_s)


# ------------------------------------------------------------------ inference


async def infer(plane: DataPlane, call: InferCall, default_timeout_s: float) -> InferAnswer:
    """Validate ``call`` against the model's metadata, run each image, and build the output tensors."""
    spec = plane.endpoint(call.model).spec
    check_version(spec, call.version)
    metadata = model_metadata(spec)
    wanted = _wanted_outputs(metadata, call.outputs)
    inputs = _checked_inputs(metadata, call.inputs)
    images = _images(inputs, "image")
    references = _images(inputs, "reference") if spec.needs_reference else [None] * len(images)
    if len(references) != len(images):
        raise InvalidInput(f"{len(images)} images but {len(references)} references: send one reference per image")
    options = options_from(call.parameters)
    timeout_s = timeout_from(call.parameters, default_timeout_s)
    outcomes = await asyncio.gather(*(
        plane.infer(spec.name, None, InferenceRequest(image, reference, options), timeout_s)
        for image, reference in zip(images, references)
    ))
    metrics.note_outcomes(outcomes)
    built = TASKS[spec.task].oip_tensors(spec, [outcome.result for outcome in outcomes], wanted, options)
    encoded = {output.name for output in metadata.outputs if output.encoded}
    tensors = [Tensor(name, built[name][0], list(built[name][1].shape), built[name][1], name in encoded)
               for name in wanted]
    return InferAnswer(spec.name, MODEL_VERSION, call.id, tensors)


def _wanted_outputs(metadata: ModelMetadata, requested: list[str] | None) -> list[str]:
    names = [spec.name for spec in metadata.outputs]
    if requested is None:
        return names
    for name in requested:
        if name not in names:
            raise InvalidInput(f"model {metadata.name!r} has no output {name!r}; its outputs are {', '.join(names)}")
    return list(dict.fromkeys(requested))


def _checked_inputs(metadata: ModelMetadata, inputs: list[Tensor]) -> dict[str, Tensor]:
    declared = {spec.name: spec for spec in metadata.inputs}
    checked: dict[str, Tensor] = {}
    for tensor in inputs:
        spec = declared.get(tensor.name)
        if spec is None:
            raise InvalidInput(
                f"model {metadata.name!r} has no input {tensor.name!r}; its inputs are {', '.join(declared)}"
            )
        if tensor.name in checked:
            raise InvalidInput(f"input {tensor.name!r} is given twice")
        if tensor.datatype != spec.datatype:
            raise InvalidInput(f"input {tensor.name!r}: datatype must be {spec.datatype}, got {tensor.datatype}")
        _check_shape(tensor, spec)
        checked[tensor.name] = tensor
    return checked


def _check_shape(tensor: Tensor, spec: TensorSpec) -> None:
    shape = tensor.shape
    if spec.datatype == "BYTES":
        fits = len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)
        expected = "[N] or [N, 1]"
    else:
        fits = len(shape) == len(spec.shape) and all(want in (-1, got) for want, got in zip(spec.shape, shape))
        dims = ["N", *("*" if dim == -1 else str(dim) for dim in spec.shape[1:])]
        expected = f"[{', '.join(dims)}]"
    if not fits:
        raise InvalidInput(f"input {tensor.name!r}: shape must be {expected}, got {shape}")
    if not 1 <= shape[0] <= MAX_IMAGES_PER_REQUEST:
        raise InvalidInput(
            f"input {tensor.name!r}: a request carries 1..{MAX_IMAGES_PER_REQUEST} images, got {shape[0]}"
        )


def _images(inputs: dict[str, Tensor], prefix: str) -> list[bytes | np.ndarray]:
    encoded, pixels = inputs.get(prefix), inputs.get(f"{prefix}_pixels")
    if (encoded is None) == (pixels is None):
        raise InvalidInput(f"send exactly one of the inputs {prefix!r} (encoded images) and {prefix + '_pixels'!r}")
    if pixels is not None:
        return [image.copy() for image in pixels.data]  # writable, one array per image
    return [_image_bytes(prefix, element) for element in encoded.data.reshape(-1)]


def _image_bytes(name: str, element: bytes | str) -> bytes:
    if isinstance(element, bytes):
        return element
    try:
        return base64.b64decode(element, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"input {name!r}: in JSON, encoded images are base64 strings") from None
