"""Wire schemas of the hybridserve API, shared by the server and the client.

Pure pydantic: importing this module never imports torch or Ray. The server
validates its responses against these models and the client parses responses
into them, so both sides agree on one definition of every message. The task
results are defined in ``results.py`` (beside the task table that names them,
``tasks.py``) and exported here too.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from hybridserve_client.results import (
    AssessmentResult,
    ClassificationResult,
    ClassPrediction,
    Detection,
    DetectionResult,
    RestorationResult,
    SegmentationResult,
    SegmentClass,
    _Schema,
    fixed_array,
)
from hybridserve_client.tasks import FORMATS, TASKS

# The task names of the task table, as a type (a spec's ``task:``; ``ModelInfo.task``).
Task = Literal[tuple(task.name for task in TASKS)]  # type: ignore[valid-type]
ModelStatus = Literal["loading", "ready", "failed"]

# The HTTP verb that serves each task: POST /v1/models/{name}/{verb}.
TASK_VERBS: dict[str, str] = {task.name: task.verb for task in TASKS}


class ErrorBody(_Schema):
    code: str = Field(description="Stable machine-readable error code, e.g. 'invalid_input'.")
    message: str = Field(description="Human-readable explanation.")


class ErrorResponse(_Schema):
    error: ErrorBody


# ---------------------------------------------------------------- requests


class ImageRequest(_Schema):
    """JSON form of an inference request: images travel as base64 strings."""

    image: str = Field(description="The image, base64-encoded (JPEG, PNG, WebP, BMP or TIFF).")
    reference: str | None = Field(
        default=None, description="Full-reference IQA only: the pristine reference image, base64."
    )
    top_k: int | None = Field(default=None, ge=1, le=1000, description="Classification: how many classes.")
    score_threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Detection: drop detections scoring below this."
    )
    max_detections: int | None = Field(default=None, ge=1, le=1000, description="Detection: keep at most this many.")
    format: Literal[FORMATS] | None = Field(  # type: ignore[valid-type]
        default=None, description="Restoration: encoding of the output image (png, jpeg, webp; default png). "
        "Segmentation: how the mask travels (png, or rle: each class's run lengths; default png)."
    )


# ---------------------------------------------------------------- metadata


class InputContract(_Schema):
    input_size: Annotated[tuple[int, int], fixed_array(2, "integer")] | None = Field(
        default=None, description="(height, width) the model sees.")
    resize: str
    color: Literal["rgb", "gray"]
    scale: int | None = Field(default=None, description="Restoration: output/input size ratio.")
    tile: int | None = None
    tile_overlap: int | None = None
    needs_reference: bool = False


class BatchingInfo(_Schema):
    max_batch_size: int
    max_wait_ms: float
    latency_slo_ms: float | None = None
    tuned_batch_size: int | None = Field(
        default=None, description="The batch size, up to max_batch_size, that computed fastest per item on this "
                                  "replica's live batches (batching.tune): batches fill up to it. None: not tuned.")


class ModelInfo(_Schema):
    name: str
    task: Task
    verb: str
    architecture: str
    status: ModelStatus
    reason: str | None = Field(default=None, description="Why the model is not ready, when it failed.")
    input: InputContract
    batching: BatchingInfo
    labels: int = Field(description="Number of labels (classification, detection and segmentation).")
    backend: str | None = Field(default=None, description="Compile backend in use once loaded.")
    precision: str | None = Field(default=None, description="Precision in use once loaded: fp32, fp16, bf16 or int8.")
    precision_reason: str | None = Field(default=None, description="int8: the accuracy gate's verdict, or why the "
                                         "model serves fp32 instead (gate failed, no int8 kernels, ...).")
    fp32_layers: list[str] = Field(default_factory=list, description="int8: the layers the accuracy gate kept in fp32.")
    device: str
    load_seconds: float | None = None
    description: str | None = None


class ModelList(_Schema):
    models: list[ModelInfo]


class Health(_Schema):
    status: Literal["ok", "unavailable"]
    models: dict[str, ModelStatus] = Field(default_factory=dict)


__all__ = [
    "TASK_VERBS", "AssessmentResult", "BatchingInfo", "ClassPrediction", "ClassificationResult", "Detection",
    "DetectionResult", "ErrorBody", "ErrorResponse", "Health", "ImageRequest", "InputContract", "ModelInfo",
    "ModelList", "ModelStatus", "RestorationResult", "SegmentClass", "SegmentationResult", "Task",
]
