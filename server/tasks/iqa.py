"""Image quality assessment: a no-reference score for one image, or a full-reference score for a pair."""

from __future__ import annotations

import numpy as np

from hybridserve_client.schemas import AssessmentResult
from hybridserve.server.core.errors import InvalidInput
from hybridserve.server.tasks.base import Options, Output, Prepared, TaskHandler
from hybridserve.server.core.images import resize_for_model


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

    def postprocess(self, prepared: Prepared, outputs: list[Output]) -> AssessmentResult:
        iqa = self.spec.iqa
        return AssessmentResult(
            model=self.spec.name,
            score=float(outputs[0].flatten()[0]),
            kind=iqa.kind,
            range=iqa.range,
            higher_is_better=iqa.higher_is_better,
        )
