"""Detection: resize to the model's input, batched boxes, boxes mapped back to input-image pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hybridserve_client.schemas import Detection, DetectionResult
from hybridserve.server.core.images import resize_for_model
from hybridserve.server.core.spec import ModelSpec
from hybridserve.server.tasks.base import (
    Options, Output, Prepared, Task, TaskHandler, TensorSpec, label_of, object_array,
)

DEFAULT_SCORE_THRESHOLD = 0.3
DEFAULT_MAX_DETECTIONS = 100


@dataclass(frozen=True)
class Boxes:
    """The neutral output: kept detections, best first, in input-image pixels."""

    boxes: np.ndarray  # float64 [K, 4]: x1, y1, x2, y2, rounded to 0.01 px
    scores: np.ndarray  # float32 [K]
    labels: np.ndarray  # int64 [K]
    width: int
    height: int


class DetectionHandler(TaskHandler):
    task = "detection"

    def prepare(self, image: np.ndarray, reference: np.ndarray | None, options: Options) -> Prepared:
        pre = self.spec.preprocessing
        resized, placement = resize_for_model(image, pre.input_size, pre.resize)
        threshold = DEFAULT_SCORE_THRESHOLD if options.score_threshold is None else options.score_threshold
        return Prepared(
            items=[self.to_tensor(resized)],
            context={"placement": placement, "width": image.shape[1], "height": image.shape[0],
                     "threshold": threshold, "max_detections": options.max_detections or DEFAULT_MAX_DETECTIONS},
        )

    def postprocess(self, prepared: Prepared, outputs: list[Output]) -> Boxes:
        boxes, scores, labels = (part.numpy() for part in outputs[0])
        ctx = prepared.context
        in_h, in_w = self.spec.preprocessing.input_size
        order = np.argsort(-scores, kind="stable")
        order = order[scores[order] >= ctx["threshold"]]
        placed = boxes[order].astype(np.float64) * np.array([in_w, in_h, in_w, in_h])
        placed = ctx["placement"].boxes_to_original(placed)
        placed[:, 0::2] = placed[:, 0::2].clip(0.0, ctx["width"])
        placed[:, 1::2] = placed[:, 1::2].clip(0.0, ctx["height"])
        placed = placed.round(2)
        keep = (placed[:, 2] > placed[:, 0]) & (placed[:, 3] > placed[:, 1])
        order, placed = order[keep][:ctx["max_detections"]], placed[keep][:ctx["max_detections"]]
        return Boxes(placed, scores[order].clip(0.0, 1.0).astype(np.float32),
                     labels[order].astype(np.int64), ctx["width"], ctx["height"])


class DetectionTask(Task):
    name = "detection"
    verb = "detect"
    handler = DetectionHandler
    result = DetectionResult
    options = ("score_threshold", "max_detections")

    def typed(self, spec: ModelSpec, output: Boxes, options: Options) -> DetectionResult:
        return DetectionResult(model=spec.name, width=output.width, height=output.height, detections=[
            Detection(box=tuple(float(v) for v in box), label=label_of(spec, int(index)), index=int(index),
                      score=float(score))
            for box, score, index in zip(output.boxes, output.scores, output.labels)
        ])

    def oip_outputs(self, spec: ModelSpec) -> tuple[TensorSpec, ...]:
        return (
            TensorSpec("boxes", "FP32", (-1, -1, 4)),
            TensorSpec("scores", "FP32", (-1, -1)),
            TensorSpec("labels", "INT64", (-1, -1)),
            TensorSpec("label_names", "BYTES", (-1, -1)),
            TensorSpec("count", "INT64", (-1,)),
        )

    def oip_tensors(self, spec: ModelSpec, outputs: list[Boxes], wanted: list[str],
                    options: Options) -> dict[str, tuple[str, np.ndarray]]:
        """Detections padded to the most any image has: zero boxes and scores, label -1, name b""."""
        n, k = len(outputs), max(len(output.scores) for output in outputs)
        boxes, scores = np.zeros((n, k, 4), dtype=np.float32), np.zeros((n, k), dtype=np.float32)
        labels, names = np.full((n, k), -1, dtype=np.int64), object_array([b""] * (n * k), (n, k))
        for row, output in enumerate(outputs):
            count = len(output.scores)
            boxes[row, :count], scores[row, :count], labels[row, :count] = output.boxes, output.scores, output.labels
            for column, index in enumerate(output.labels):
                names[row, column] = label_of(spec, int(index)).encode()
        counts = np.array([len(output.scores) for output in outputs], dtype=np.int64)
        return {"boxes": ("FP32", boxes), "scores": ("FP32", scores), "labels": ("INT64", labels),
                "label_names": ("BYTES", names), "count": ("INT64", counts)}


TASK = DetectionTask()
