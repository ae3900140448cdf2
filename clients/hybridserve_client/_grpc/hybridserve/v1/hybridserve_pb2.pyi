from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "image", "top_k")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: bytes
    top_k: int
    def __init__(self, model: _Optional[str] = ..., image: _Optional[bytes] = ..., top_k: _Optional[int] = ...) -> None: ...

class DetectRequest(_message.Message):
    __slots__ = ("model", "image", "score_threshold", "max_detections")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: bytes
    score_threshold: float
    max_detections: int
    def __init__(self, model: _Optional[str] = ..., image: _Optional[bytes] = ..., score_threshold: _Optional[float] = ..., max_detections: _Optional[int] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("model", "image", "format")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: bytes
    format: str
    def __init__(self, model: _Optional[str] = ..., image: _Optional[bytes] = ..., format: _Optional[str] = ...) -> None: ...

class AssessRequest(_message.Message):
    __slots__ = ("model", "image", "reference")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: bytes
    reference: bytes
    def __init__(self, model: _Optional[str] = ..., image: _Optional[bytes] = ..., reference: _Optional[bytes] = ...) -> None: ...

class SegmentRequest(_message.Message):
    __slots__ = ("model", "image", "format")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: bytes
    format: str
    def __init__(self, model: _Optional[str] = ..., image: _Optional[bytes] = ..., format: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ClassPrediction(_message.Message):
    __slots__ = ("label", "index", "score")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    label: str
    index: int
    score: float
    def __init__(self, label: _Optional[str] = ..., index: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class ClassificationResult(_message.Message):
    __slots__ = ("model", "predictions")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    predictions: _containers.RepeatedCompositeFieldContainer[ClassPrediction]
    def __init__(self, model: _Optional[str] = ..., predictions: _Optional[_Iterable[_Union[ClassPrediction, _Mapping]]] = ...) -> None: ...

class Detection(_message.Message):
    __slots__ = ("box", "label", "index", "score")
    BOX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    box: _containers.RepeatedScalarFieldContainer[float]
    label: str
    index: int
    score: float
    def __init__(self, box: _Optional[_Iterable[float]] = ..., label: _Optional[str] = ..., index: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class DetectionResult(_message.Message):
    __slots__ = ("model", "width", "height", "detections")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    width: int
    height: int
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    def __init__(self, model: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ...) -> None: ...

class RestorationResult(_message.Message):
    __slots__ = ("model", "width", "height", "format", "image")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    model: str
    width: int
    height: int
    format: str
    image: bytes
    def __init__(self, model: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., format: _Optional[str] = ..., image: _Optional[bytes] = ...) -> None: ...

class AssessmentResult(_message.Message):
    __slots__ = ("model", "score", "kind", "range", "higher_is_better")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    HIGHER_IS_BETTER_FIELD_NUMBER: _ClassVar[int]
    model: str
    score: float
    kind: str
    range: _containers.RepeatedScalarFieldContainer[float]
    higher_is_better: bool
    def __init__(self, model: _Optional[str] = ..., score: _Optional[float] = ..., kind: _Optional[str] = ..., range: _Optional[_Iterable[float]] = ..., higher_is_better: _Optional[bool] = ...) -> None: ...

class SegmentClass(_message.Message):
    __slots__ = ("index", "label", "pixels", "fraction", "rle")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    RLE_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    pixels: int
    fraction: float
    rle: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., pixels: _Optional[int] = ..., fraction: _Optional[float] = ..., rle: _Optional[_Iterable[int]] = ...) -> None: ...

class SegmentationResult(_message.Message):
    __slots__ = ("model", "width", "height", "labels", "classes", "mask", "mask_format")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    MASK_FORMAT_FIELD_NUMBER: _ClassVar[int]
    model: str
    width: int
    height: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    classes: _containers.RepeatedCompositeFieldContainer[SegmentClass]
    mask: bytes
    mask_format: str
    def __init__(self, model: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., classes: _Optional[_Iterable[_Union[SegmentClass, _Mapping]]] = ..., mask: _Optional[bytes] = ..., mask_format: _Optional[str] = ...) -> None: ...

class InputContract(_message.Message):
    __slots__ = ("input_size", "resize", "color", "scale", "tile", "tile_overlap", "needs_reference")
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    COLOR_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    TILE_FIELD_NUMBER: _ClassVar[int]
    TILE_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    NEEDS_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    input_size: _containers.RepeatedScalarFieldContainer[int]
    resize: str
    color: str
    scale: int
    tile: int
    tile_overlap: int
    needs_reference: bool
    def __init__(self, input_size: _Optional[_Iterable[int]] = ..., resize: _Optional[str] = ..., color: _Optional[str] = ..., scale: _Optional[int] = ..., tile: _Optional[int] = ..., tile_overlap: _Optional[int] = ..., needs_reference: _Optional[bool] = ...) -> None: ...

class BatchingInfo(_message.Message):
    __slots__ = ("max_batch_size", "max_wait_ms", "latency_slo_ms", "tuned_batch_size")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_SLO_MS_FIELD_NUMBER: _ClassVar[int]
    TUNED_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_wait_ms: float
    latency_slo_ms: float
    tuned_batch_size: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_wait_ms: _Optional[float] = ..., latency_slo_ms: _Optional[float] = ..., tuned_batch_size: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "task", "verb", "architecture", "status", "reason", "input", "batching", "labels", "backend", "device", "load_seconds", "description", "precision", "precision_reason", "fp32_layers")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    VERB_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_REASON_FIELD_NUMBER: _ClassVar[int]
    FP32_LAYERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    task: str
    verb: str
    architecture: str
    status: str
    reason: str
    input: InputContract
    batching: BatchingInfo
    labels: int
    backend: str
    device: str
    load_seconds: float
    description: str
    precision: str
    precision_reason: str
    fp32_layers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., task: _Optional[str] = ..., verb: _Optional[str] = ..., architecture: _Optional[str] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ..., input: _Optional[_Union[InputContract, _Mapping]] = ..., batching: _Optional[_Union[BatchingInfo, _Mapping]] = ..., labels: _Optional[int] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., load_seconds: _Optional[float] = ..., description: _Optional[str] = ..., precision: _Optional[str] = ..., precision_reason: _Optional[str] = ..., fp32_layers: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelList(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
