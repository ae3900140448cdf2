"""Classification: resize to the model's input, batched logits, top-k labels with softmax scores."""

from __future__ import annotations

import numpy as np
import torch

from hybridserve_client.schemas import ClassificationResult, ClassPrediction
from hybridserve.server.tasks.base import Options, Output, Prepared, TaskHandler
from hybridserve.server.core.images import resize_for_model

DEFAULT_TOP_K = 5


class ClassificationHandler(TaskHandler):
    task = "classification"

    def prepare(self, image: np.ndarray, reference: np.ndarray | None, options: Options) -> Prepared:
        pre = self.spec.preprocessing
        resized, _ = resize_for_model(image, pre.input_size, pre.resize)
        return Prepared(items=[self.to_tensor(resized)], context={"top_k": options.top_k or DEFAULT_TOP_K})

    def postprocess(self, prepared: Prepared, outputs: list[Output]) -> ClassificationResult:
        logits = outputs[0]
        probabilities = torch.softmax(logits.float().flatten(), dim=0)
        k = min(prepared.context["top_k"], probabilities.numel())
        scores, indices = torch.topk(probabilities, k)
        labels = self.spec.labels
        return ClassificationResult(
            model=self.spec.name,
            predictions=[
                ClassPrediction(label=labels[i] if i < len(labels) else str(i), index=i, score=min(1.0, float(s)))
                for s, i in zip(scores.tolist(), indices.tolist())
            ],
        )
