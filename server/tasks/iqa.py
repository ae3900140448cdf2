"""Image quality assessment: a no-reference score for one image, or a full-reference score for a pair."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hybridserve_client.schemas import AssessmentResult
from hybridserve.server.core.errors import InvalidInput
from hybridserve.server.core.images import resize_for_model
from hybridserve.server.core.spec import ModelSpec
from hybridserve.server.tasks.base import Options, Output, Prepared, Task, TaskHandler, TensorSpec


@dataclass(frozen=True)
class Score:
    """The neutral output: one quality score."""

    value: float


class IQAHandler(TaskHandler):
    task = "iqa"

    def prepare(self, image: np.ndarray, reference: np.ndarray | None, options: Options) -> Prepared:
        pre = self.spec.preprocessing
        if reference is None:
            if pre.input_size is not None:
                image, _ = resize_for_model(image, pre.input_size, pre.resize)
            return Prepared(items=[self.to_tensor(image)])
        if reference.shape != image.shape:
            raise InvalidInput(
                f"reference is {reference.shape[1]}x{reference.shape[0]} but image is "
                f"{image.shape[1]}x{image.shape[0]}: full-reference IQA needs images of the same size"
            )
        return Prepared(items=[(self.to_tensor(reference), self.to_tensor(image))])

    def postprocess(self, prepared: Prepared, outputs: list[Output]) -> Score:
        return Score(float(outputs[0].flatten()[0]))


class IQATask(Task):
    name = "iqa"
    verb = "assess"
    handler = IQAHandler
    result = AssessmentResult
    tiled = True  # full-reference metrics take any size

    def check(self, spec: ModelSpec) -> None:
        if spec.iqa is None:
            raise ValueError("an iqa model needs an iqa section (kind, range, higher_is_better)")

    def typed(self, spec: ModelSpec, output: Score, options: Options) -> AssessmentResult:
        iqa = spec.iqa
        return AssessmentResult(model=spec.name, score=output.value, kind=iqa.kind, range=iqa.range,
                                higher_is_better=iqa.higher_is_better)

    def grpc_options(self, request) -> dict:
        return {}

    def oip_outputs(self, spec: ModelSpec) -> tuple[TensorSpec, ...]:
        return (TensorSpec("score", "FP32", (-1,)),)

    def oip_tensors(self, spec: ModelSpec, outputs: list[Score], wanted: list[str],
                    options: Options) -> dict[str, tuple[str, np.ndarray]]:
        return {"score": ("FP32", np.array([output.value for output in outputs], dtype=np.float32))}


TASK = IQATask()
