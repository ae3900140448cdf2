"""Classification: resize to the model's input, batched logits, class probabilities; top-k in the result."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hybridserve_client.schemas import ClassificationResult, ClassPrediction
from hybridserve.server.core.images import resize_for_model
from hybridserve.server.core.spec import ModelSpec
from hybridserve.server.tasks.base import (
    Options, Output, Prepared, Task, TaskHandler, TensorSpec, label_of, object_array,
)

DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class ClassScores:
    """The neutral output: the probability of every class (softmax of the logits)."""

    probabilities: np.ndarray  # float32 [classes]

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices and scores of the ``k`` most probable classes, best first."""
        k = min(k, self.probabilities.size)
        indices = np.argpartition(-self.probabilities, k - 1)[:k]
        indices = indices[np.argsort(-self.probabilities[indices], kind="stable")]
        return indices, self.probabilities[indices]


class ClassificationHandler(TaskHandler):
    task = "classification"

    def prepare(self, image: np.ndarray, reference: np.ndarray | None, options: Options) -> Prepared:
        pre = self.spec.preprocessing
        resized, _ = resize_for_model(image, pre.input_size, pre.resize)
        return Prepared(items=[self.to_tensor(resized)])

    def batch_outputs(self, result: Output) -> Output:
        return torch.softmax(result.float().flatten(1), dim=1)  # the whole batch's probabilities at once

    def postprocess(self, prepared: Prepared, outputs: list[Output]) -> ClassScores:
        return ClassScores(outputs[0].numpy().astype(np.float32, copy=False))


class ClassificationTask(Task):
    name = "classification"
    verb = "classify"
    handler = ClassificationHandler
    result = ClassificationResult
    options = ("top_k",)

    def typed(self, spec: ModelSpec, output: ClassScores, options: Options) -> ClassificationResult:
        indices, scores = output.top(options.top_k or DEFAULT_TOP_K)
        return ClassificationResult(model=spec.name, predictions=[
            ClassPrediction(label=label_of(spec, int(i)), index=int(i), score=min(1.0, float(s)))
            for i, s in zip(indices, scores)
        ])

    def oip_outputs(self, spec: ModelSpec) -> tuple[TensorSpec, ...]:
        return (
            TensorSpec("probabilities", "FP32", (-1, len(spec.labels) or -1)),
            TensorSpec("top_k_labels", "BYTES", (-1, -1)),
            TensorSpec("top_k_scores", "FP32", (-1, -1)),
            TensorSpec("top_k_indices", "INT64", (-1, -1)),
        )

    def oip_tensors(self, spec: ModelSpec, outputs: list[ClassScores], wanted: list[str],
                    options: Options) -> dict[str, tuple[str, np.ndarray]]:
        tops = [output.top(options.top_k or DEFAULT_TOP_K) for output in outputs]
        indices = np.stack([i for i, _ in tops]).astype(np.int64)
        labels = [label_of(spec, int(i)).encode() for i in indices.reshape(-1)]
        return {
            "probabilities": ("FP32", np.stack([output.probabilities for output in outputs])),
            "top_k_labels": ("BYTES", object_array(labels, indices.shape)),
            "top_k_scores": ("FP32", np.stack([s for _, s in tops]).astype(np.float32)),
            "top_k_indices": ("INT64", indices),
        }


TASK = ClassificationTask()
