"""LitServe peer of the benchmark: the same model behind a ``LitAPI`` with LitServe's own batching.

A module of its own because LitServe pickles the API into its inference worker process, and
without ``from __future__ import annotations``: LitServe reads ``decode_request``'s annotation
to decide how to parse the body.
"""

from typing import Any

import litserve as ls

from benchmarks.peers import Pipeline
from hybridserve.server.tasks.base import Prepared


class BenchAPI(ls.LitAPI):
    def __init__(self, spec_path: str, **options: Any):
        super().__init__(**options)
        self.spec_path = spec_path

    def setup(self, device: str) -> None:
        self.pipeline = Pipeline(self.spec_path)

    def decode_request(self, request: dict[str, Any]) -> Prepared:
        return self.pipeline.prepare(request)

    def batch(self, inputs: list[Prepared]) -> list[Prepared]:
        return inputs

    def predict(self, batch: Any) -> Any:
        many = isinstance(batch, list)
        prepared = batch if many else [batch]
        outputs = list(zip(prepared, self.pipeline.forward(prepared)))
        return outputs if many else outputs[0]

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output: tuple[Prepared, list[Any]]) -> dict[str, Any]:
        return self.pipeline.respond(*output)
