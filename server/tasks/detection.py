"""Detection: resize to the model's input, batched boxes, boxes mapped back to input-image pixels."""

from __future__ import annotations

import numpy as np

from hybridserve_client.schemas import Detection, DetectionResult
from hybridserve.server.tasks.base import Options, Output, Prepared, TaskHandler
from hybridserve.server.core.images import resize_for_model

DEFAULT_SCORE_THRESHOLD = 0.3
DEFAULT_MAX_DETECTIONS = 100


class DetectionHandler(TaskHandler):
    task = "detection"

    def prepare(self, image: np.ndarray, reference: np.ndarray | None, options: Options) -> Prepared:
        pre = self.spec.preprocessing
        resized, placement = resize_for_model(image, pre.input_size, pre.resize)
        threshold = DEFAULT_SCORE_THRESHOLD if options.score_threshold is None else options.score_threshold
        return Prepared(
            items=[self.to_tensor(resized)],
            context={
                "placement": placement,
                "width": image.shape[1],
                "height": image.shape[0],
                "threshold": threshold,
                "max_detections": options.max_detections or DEFAULT_MAX_DETECTIONS,
            },
        )

    def postprocess(self, prepared: Prepared, outputs: list[Output]) -> DetectionResult:
        boxes, scores, labels = outputs[0]
        ctx = prepared.context
        in_h, in_w = self.spec.preprocessing.input_size
        width, height = ctx["width"], ctx["height"]
        detections = []
        order = scores.argsort(descending=True).tolist()
        for i in order:
            score = float(scores[i])
            if score < ctx["threshold"] or len(detections) >= ctx["max_detections"]:
                break
            x1, y1, x2, y2 = (boxes[i] * boxes.new_tensor([in_w, in_h, in_w, in_h])).tolist()
            x1, y1 = ctx["placement"].to_original(x1, y1)
            x2, y2 = ctx["placement"].to_original(x2, y2)
            box = (_clip(x1, width), _clip(y1, height), _clip(x2, width), _clip(y2, height))
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            index = int(labels[i])
            label = self.spec.labels[index] if 0 <= index < len(self.spec.labels) else str(index)
            detections.append(Detection(box=box, label=label, index=index, score=min(1.0, max(0.0, score))))
        return DetectionResult(model=self.spec.name, width=width, height=height, detections=detections)


def _clip(value: float, limit: int) -> float:
    return round(min(max(value, 0.0), float(limit)), 2)
