"""BentoML peer of the benchmark: the same model behind a batchable BentoML API (adaptive batching).

BentoML's batchable endpoints take a list and batch lists of many requests together, so a
client sends ``{"images": [<base64 PNG>]}`` (one image per request, as the other servers get).
Started by the benchmark as ``bentoml serve benchmarks.bentoml_service:BenchService`` with
``BENCH_SPEC``, ``BENCH_MAX_BATCH`` and ``BENCH_MAX_LATENCY_MS`` (BentoML's latency goal, which
its dispatcher uses to size batches and waits) in the environment; bentoml itself is
a bench-only tool installed apart from the project's environment (see docs/performance.md).
"""

from __future__ import annotations

import os
from typing import Any

import bentoml

from benchmarks.peers import Pipeline

MAX_BATCH = int(os.environ.get("BENCH_MAX_BATCH", "32"))
MAX_LATENCY_MS = int(os.environ.get("BENCH_MAX_LATENCY_MS", "1000"))


@bentoml.service(workers=1, traffic={"timeout": 600})
class BenchService:
    def __init__(self) -> None:
        self.pipeline = Pipeline(os.environ["BENCH_SPEC"])

    @bentoml.api(**({"batchable": True, "batch_dim": 0, "max_batch_size": MAX_BATCH, "max_latency_ms": MAX_LATENCY_MS}
                    if MAX_BATCH > 1 else {}))  # BentoML refuses a batchable API with max_batch_size 1
    def predict(self, images: list[str]) -> list[dict[str, Any]]:
        prepared = [self.pipeline.prepare({"image": image}) for image in images]
        return [self.pipeline.respond(p, out) for p, out in zip(prepared, self.pipeline.forward(prepared))]

    @bentoml.api
    def health(self) -> dict[str, str]:
        return {"status": "ok"}
