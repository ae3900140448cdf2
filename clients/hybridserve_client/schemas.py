"""Wire schemas of the hybridserve API, shared by the server and the client.

Pure pydantic: importing this module never imports torch or Ray. The server
validates its responses against these models and the client parses responses
into them, so both sides agree on one definition of every message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # the helpers import numpy and PIL only when called
    import numpy as np
    from PIL import Image

Task = Literal["classification", "detection", "restoration", "iqa"]
ModelStatus = Literal["loading", "ready", "failed"]

# The HTTP verb that serves each task: POST /v1/models/{name}/{verb}.
TASK_VERBS: dict[str, str] = {
    "classification": "classify",
    "detection": "detect",
    "restoration": "restore",
    "iqa": "assess",
}


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    format: Literal["png", "jpeg", "webp"] | None = Field(
        default=None, description="Restoration: encoding of the output image (default png)."
    )


# ---------------------------------------------------------------- results


class ClassPrediction(_Schema):
    label: str
    index: int
    score: float = Field(ge=0.0, le=1.0)


class ClassificationResult(_Schema):
    model: str
    predictions: list[ClassPrediction]

    @property
    def top1(self) -> ClassPrediction:
        """The highest-scoring prediction."""
        return max(self.predictions, key=lambda prediction: prediction.score)


class Detection(_Schema):
    box: tuple[float, float, float, float] = Field(description="[x1, y1, x2, y2] in input-image pixels.")
    label: str
    index: int
    score: float = Field(ge=0.0, le=1.0)


class DetectionResult(_Schema):
    model: str
    width: int
    height: int
    detections: list[Detection]

    @property
    def boxes(self) -> np.ndarray:
        """(N, 4) float32 array of [x1, y1, x2, y2]."""
        import numpy as np

        return np.array([d.box for d in self.detections], dtype=np.float32).reshape(-1, 4)

    @property
    def scores(self) -> np.ndarray:
        """(N,) float32 array of scores."""
        import numpy as np

        return np.array([d.score for d in self.detections], dtype=np.float32)

    @property
    def labels(self) -> list[str]:
        return [d.label for d in self.detections]

    def draw(self, image: Any, width: int = 2) -> Image.Image:
        """A copy of ``image`` (any client image input) with each box and its label and score drawn on it."""
        from PIL import ImageDraw

        from hybridserve_client.inputs import to_pil

        canvas = to_pil(image).convert("RGB")
        pen = ImageDraw.Draw(canvas)
        palette = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")
        for detection in self.detections:
            color = palette[detection.index % len(palette)]
            x1, y1, x2, y2 = detection.box
            pen.rectangle((x1, y1, x2, y2), outline=color, width=width)
            pen.text((x1 + 2, max(0.0, y1 - 11)), f"{detection.label} {detection.score:.2f}", fill=color)
        return canvas


class RestorationResult(_Schema):
    model: str
    width: int
    height: int
    format: Literal["png", "jpeg", "webp"]
    image: str = Field(description="The restored image, base64-encoded in `format`.")


class AssessmentResult(_Schema):
    model: str
    score: float
    kind: Literal["no-reference", "full-reference"]
    range: tuple[float, float]
    higher_is_better: bool


# ---------------------------------------------------------------- metadata


class InputContract(_Schema):
    input_size: tuple[int, int] | None = Field(default=None, description="(height, width) the model sees.")
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


class ModelInfo(_Schema):
    name: str
    task: Task
    verb: str
    architecture: str
    status: ModelStatus
    reason: str | None = Field(default=None, description="Why the model is not ready, when it failed.")
    input: InputContract
    batching: BatchingInfo
    labels: int = Field(description="Number of labels (classification and detection).")
    backend: str | None = Field(default=None, description="Compile backend in use once loaded.")
    device: str
    load_seconds: float | None = None
    description: str | None = None


class ModelList(_Schema):
    models: list[ModelInfo]


class Health(_Schema):
    status: Literal["ok", "unavailable"]
    models: dict[str, ModelStatus] = Field(default_factory=dict)
