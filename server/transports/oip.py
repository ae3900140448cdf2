"""The Open Inference Protocol (KServe v2), independent of transport: tensors, metadata, inference.

The HTTP adapter (``oip_http``) and the gRPC adapter (``grpc_services``) only translate their wire
format to ``Tensor``/``InferCall`` and back; everything else is here. Each model declares its
tensors by task (see ``model_metadata``):

* inputs: ``image`` (BYTES ``[N]`` or ``[N, 1]``: encoded JPEG/PNG/... files, base64 strings in
  JSON) or ``image_pixels`` (UINT8 ``[N, H, W, 3]``); full-reference IQA models also take
  ``reference`` or ``reference_pixels`` of the same forms.
* outputs: classification ``probabilities``, ``top_k_labels``, ``top_k_scores``, ``top_k_indices``;
  detection ``boxes``, ``scores``, ``labels`` (-1 pads), ``label_names``, ``count``; restoration
  ``restored_image`` (UINT8) and ``restored_encoded`` (BYTES); IQA ``score``.

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

from hybridserve_client.schemas import (
    AssessmentResult,
    ClassificationResult,
    DetectionResult,
    ImageRequest,
)
from hybridserve.server.observability import metrics
from hybridserve.server.engine.dataplane import DataPlane
from hybridserve.server.core.errors import InvalidInput, ModelNotFound
from hybridserve.server.tasks import InferenceRequest, Options, RestoredImage
from hybridserve.server.tasks.classification import DEFAULT_TOP_K
from hybridserve.server.core.spec import ModelSpec

SERVER_NAME = "hybridserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("binary_tensor_data", "parameters")
MODEL_VERSION = "1"
MAX_IMAGES_PER_REQUEST = 256
# Asking the classifier for this many classes returns all of them (it caps at the class count).
ALL_CLASSES = 1 << 30

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
# BYTES tensors whose elements are binary files, hence base64 strings in JSON.
ENCODED_IMAGE_TENSORS = frozenset({"image", "reference", "restored_encoded"})
OPTION_PARAMETERS = ("top_k", "score_threshold", "max_detections", "format")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 marks a variable dimension


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
    return TensorSpec(prefix, "BYTES", (-1,)), TensorSpec(f"{prefix}_pixels", "UINT8", (-1, -1, -1, 3))


def model_metadata(spec: ModelSpec) -> ModelMetadata:
    inputs = _image_inputs("image") + (_image_inputs("reference") if spec.needs_reference else ())
    classes = len(spec.labels) or -1
    outputs = {
        "classification": (
            TensorSpec("probabilities", "FP32", (-1, classes)),
            TensorSpec("top_k_labels", "BYTES", (-1, -1)),
            TensorSpec("top_k_scores", "FP32", (-1, -1)),
            TensorSpec("top_k_indices", "INT64", (-1, -1)),
        ),
        "detection": (
            TensorSpec("boxes", "FP32", (-1, -1, 4)),
            TensorSpec("scores", "FP32", (-1, -1)),
            TensorSpec("labels", "INT64", (-1, -1)),
            TensorSpec("label_names", "BYTES", (-1, -1)),
            TensorSpec("count", "INT64", (-1,)),
        ),
        "restoration": (
            TensorSpec("restored_image", "UINT8", (-1, -1, -1, 1 if spec.preprocessing.color == "gray" else 3)),
            TensorSpec("restored_encoded", "BYTES", (-1,)),
        ),
        "iqa": (TensorSpec("score", "FP32", (-1,)),),
    }[spec.task]
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
        return Tensor(name, datatype, list(shape), _object_array(elements, shape))
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
        array = _object_array(elements, (len(elements),))
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
    if tensor.name in ENCODED_IMAGE_TENSORS:
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


def _object_array(elements: list, shape: Sequence[int]) -> np.ndarray:
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array.reshape(shape)


# ------------------------------------------------------------------ parameters


def options_from(values: Mapping[str, Any]) -> Options:
    """Task options from request parameters, validated by the same rules as the typed HTTP API."""
    given = {key: values[key] for key in OPTION_PARAMETERS if values.get(key) is not None}
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
    requested = options_from(call.parameters)
    timeout_s = timeout_from(call.parameters, default_timeout_s)
    every_class = spec.task == "classification" and "probabilities" in wanted
    options = Options(top_k=ALL_CLASSES) if every_class else requested
    outcomes = await asyncio.gather(*(
        plane.infer(spec.name, None, InferenceRequest(image, reference, options), timeout_s)
        for image, reference in zip(images, references)
    ))
    metrics.note_outcomes(outcomes)
    tensors = _OUTPUT_BUILDERS[spec.task](spec, [outcome.result for outcome in outcomes], wanted, requested)
    return InferAnswer(spec.name, MODEL_VERSION, call.id, [tensors[name] for name in wanted])


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


# ------------------------------------------------------------------ outputs by task


def _tensor(name: str, datatype: str, array: np.ndarray) -> Tensor:
    return Tensor(name, datatype, list(array.shape), array)


def _classification(spec: ModelSpec, results: list[ClassificationResult], wanted: list[str],
                    requested: Options) -> dict[str, Tensor]:
    top = [result.predictions[:requested.top_k or DEFAULT_TOP_K] for result in results]
    n, k = len(results), len(top[0])
    labels, scores = np.empty((n, k), dtype=object), np.zeros((n, k), dtype=np.float32)
    indices = np.zeros((n, k), dtype=np.int64)
    for row, predictions in enumerate(top):
        for column, prediction in enumerate(predictions):
            labels[row, column] = prediction.label.encode()
            scores[row, column], indices[row, column] = prediction.score, prediction.index
    tensors = {
        "top_k_labels": _tensor("top_k_labels", "BYTES", labels),
        "top_k_scores": _tensor("top_k_scores", "FP32", scores),
        "top_k_indices": _tensor("top_k_indices", "INT64", indices),
    }
    if "probabilities" in wanted:
        classes = max(len(spec.labels), max(p.index for r in results for p in r.predictions) + 1)
        probabilities = np.zeros((n, classes), dtype=np.float32)
        for row, result in enumerate(results):
            for prediction in result.predictions:
                probabilities[row, prediction.index] = prediction.score
        tensors["probabilities"] = _tensor("probabilities", "FP32", probabilities)
    return tensors


def _detection(spec: ModelSpec, results: list[DetectionResult], wanted: list[str],
               requested: Options) -> dict[str, Tensor]:
    """Detections padded to the most any image has: zero boxes and scores, label -1, name b""."""
    n, k = len(results), max(len(r.detections) for r in results)
    boxes, scores = np.zeros((n, k, 4), dtype=np.float32), np.zeros((n, k), dtype=np.float32)
    labels, names = np.full((n, k), -1, dtype=np.int64), np.full((n, k), b"", dtype=object)
    for row, result in enumerate(results):
        for column, detection in enumerate(result.detections):
            boxes[row, column], scores[row, column] = detection.box, detection.score
            labels[row, column], names[row, column] = detection.index, detection.label.encode()
    counts = np.array([len(r.detections) for r in results], dtype=np.int64)
    return {
        "boxes": _tensor("boxes", "FP32", boxes),
        "scores": _tensor("scores", "FP32", scores),
        "labels": _tensor("labels", "INT64", labels),
        "label_names": _tensor("label_names", "BYTES", names),
        "count": _tensor("count", "INT64", counts),
    }


def _restoration(spec: ModelSpec, results: list[RestoredImage], wanted: list[str],
                 requested: Options) -> dict[str, Tensor]:
    encoded = _object_array([r.data for r in results], [len(results)])
    tensors = {"restored_encoded": _tensor("restored_encoded", "BYTES", encoded)}
    if "restored_image" in wanted:
        shapes = {r.pixels.shape for r in results}
        if len(shapes) > 1:
            raise InvalidInput(
                "the images restore to different sizes, which one UINT8 tensor cannot hold: request only the "
                "output 'restored_encoded', or send same-size images"
            )
        pixels = np.stack([r.pixels for r in results])
        tensors["restored_image"] = _tensor("restored_image", "UINT8", pixels)
    return tensors


def _iqa(spec: ModelSpec, results: list[AssessmentResult], wanted: list[str], requested: Options) -> dict[str, Tensor]:
    return {"score": _tensor("score", "FP32", np.array([r.score for r in results], dtype=np.float32))}


_OUTPUT_BUILDERS = {
    "classification": _classification,
    "detection": _detection,
    "restoration": _restoration,
    "iqa": _iqa,
}
