"""The peer servers of the benchmark, serving the same model with the same pre/post-processing.

* ``fastapi``: a plain FastAPI app under uvicorn calling the eager model once per request;
* ``litserve``: LitServe with its own dynamic batching (``max_batch_size``, ``batch_timeout``).

Every peer runs as many torch threads as the spec's ``device.cpus`` (as hybridserve does).
BentoML lives in ``benchmarks/bentoml_service.py`` (it is imported from its own folder), the
plain Ray Serve app in ``benchmarks/plain_ray.py``. Each answers ``POST /predict`` with
``{"image": base64}``.

Run: ``python -m benchmarks.peers {fastapi,litserve} --spec SPEC.yaml --port N``.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from hybridserve.server.tasks import TASKS, InferenceRequest, Options
from hybridserve.server.tasks.base import Prepared
from hybridserve.server.engine.runtime import ModelRuntime, configure_threads
from hybridserve.server.repository import load_spec


class Pipeline:
    """One eager model with hybridserve's handler: decode, batched forward, encode."""

    def __init__(self, spec_path: str):
        spec = load_spec(Path(spec_path))
        configure_threads(spec.device.cpus)
        self.runtime = ModelRuntime(spec)
        self.runtime.load()
        if self.runtime.status != "ready":
            raise RuntimeError(f"model failed to load: {self.runtime.reason}")
        self.handler = self.runtime.handler

    def prepare(self, body: dict[str, Any]) -> Prepared:
        return self.handler.preprocess(InferenceRequest(image=base64.b64decode(body["image"])))

    def forward(self, prepared: list[Prepared]) -> list[list[Any]]:
        """One forward for the items of every request; each request gets its own outputs back."""
        outputs = self.handler.forward([item for p in prepared for item in p.items])
        grouped, start = [], 0
        for p in prepared:
            grouped.append(outputs[start:start + len(p.items)])
            start += len(p.items)
        return grouped

    def respond(self, prepared: Prepared, outputs: list[Any]) -> dict[str, Any]:
        spec = self.handler.spec
        result = TASKS[spec.task].typed(spec, self.handler.postprocess(prepared, outputs), Options())
        return result.model_dump(mode="json")

    def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        prepared = self.prepare(body)
        return self.respond(prepared, self.forward([prepared])[0])


def serve_fastapi(args: argparse.Namespace) -> None:
    import uvicorn

    pipeline = Pipeline(args.spec)
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        body = json.loads(await request.body())
        return Response(json.dumps(await run_in_threadpool(pipeline, body)), media_type="application/json")

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def serve_litserve(args: argparse.Namespace) -> None:
    import litserve as ls

    from benchmarks.litserve_api import BenchAPI

    api = BenchAPI(args.spec, max_batch_size=args.max_batch, batch_timeout=args.wait_ms / 1000.0)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=600)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("server", choices=["fastapi", "litserve"])
    parser.add_argument("--spec", required=True, help="a spec file")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch", type=int, default=1)
    parser.add_argument("--wait-ms", type=float, default=0.0)
    args = parser.parse_args()
    {"fastapi": serve_fastapi, "litserve": serve_litserve}[args.server](args)


if __name__ == "__main__":
    main()
