"""Endpoint: one model's per-request pipeline, wherever its requests arrive.

``infer`` reads top to bottom: admit (the queue bound) → preprocess (per request; off the event
loop unless the image is small, ``TaskHandler.preprocess_inline``) → its items join the batcher → the batch runs where the model computes → postprocess (per
request) → a neutral output with its timings. The batcher is in-process (``AsyncBatcher`` over a
``ModelRuntime`` here) or in front of a Ray hop (``rayserve.remote``); the endpoint does not care
which. A ``ModelSource`` tells it how the model stands and gives it the task handler for pre- and
postprocess (for a remote model, a handler built from the traits its replica reports, without
the weights).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Protocol

from hybridserve_client.schemas import BatchingInfo, ModelInfo
from hybridserve.server.core.errors import ModelNotReady, Overloaded
from hybridserve.server.core.spec import ModelSpec
from hybridserve.server.engine.batching import Batcher
from hybridserve.server.engine.dataplane import describe
from hybridserve.server.engine.observer import NULL_OBSERVER, RuntimeObserver
from hybridserve.server.engine.runtime import Entry, InferenceOutcome, ModelRuntime, ModelState
from hybridserve.server.tasks import InferenceRequest, TaskHandler


class ModelSource(Protocol):
    spec: ModelSpec
    handler: TaskHandler | None  # None until the model is ready

    async def state(self) -> ModelState: ...


class LocalModel:
    """A ``ModelRuntime`` in this process."""

    def __init__(self, runtime: ModelRuntime):
        self.runtime = runtime
        self.spec = runtime.spec

    @property
    def handler(self) -> TaskHandler | None:
        return self.runtime.handler if self.runtime.status == "ready" else None

    async def state(self) -> ModelState:
        return self.runtime.state()


class Endpoint:
    def __init__(self, source: ModelSource, batcher: Batcher, observer: RuntimeObserver = NULL_OBSERVER,
                 work: Executor | None = None):
        self.source = source
        self.work = work  # the process's pre/postprocess threads (``runtime.work_pool``); None: asyncio's default
        self.spec = source.spec
        self.batcher = batcher
        self.observer = observer
        self.in_flight_items = 0
        self.max_queue = self.spec.batching.max_queue

    def batching(self) -> BatchingInfo:
        tuner = self.batcher.tuner
        return BatchingInfo(max_batch_size=self.batcher.max_batch_size, max_wait_ms=self.batcher.max_wait_s * 1000.0,
                            latency_slo_ms=self.spec.batching.latency_slo_ms,
                            tuned_batch_size=None if tuner is None else tuner.best)

    async def info(self) -> ModelInfo:
        return describe(self.spec, await self.source.state(), self.batching())

    async def _handler(self) -> TaskHandler:
        handler = self.source.handler
        if handler is None:  # not (yet) ready: ask once more, then refuse with the reason
            state = await self.source.state()
            handler = self.source.handler
            if handler is None:
                raise ModelNotReady(f"model {self.spec.name!r} is {state.status}"
                                    + (f": {state.reason}" if state.reason else ""), retry_after=1.0)
        return handler

    def _off_loop(self, function, *args) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(self.work, function, *args)

    async def infer(self, request: InferenceRequest, deadline: float | None) -> InferenceOutcome:
        """One request through the pipeline; ``deadline`` (``time.monotonic``) rides on its items."""
        handler = await self._handler()
        started = time.perf_counter()
        if handler.preprocess_inline(request):  # a small image: cheaper here than a thread hop
            prepared = handler.preprocess(request)
        else:
            prepared = await self._off_loop(handler.preprocess, request)
        preprocessed = time.perf_counter()
        count = len(prepared.items)
        if self.in_flight_items + count > self.max_queue and self.in_flight_items > 0:
            raise Overloaded(
                f"model {self.spec.name!r} has {self.in_flight_items} items queued (limit {self.max_queue})",
                retry_after=1.0,
            )
        self.in_flight_items += count
        self.observer.queued_items(self.spec.name, self.in_flight_items)
        entries = [Entry(item, deadline) for item in prepared.items]
        try:
            outs = await asyncio.gather(*(self.batcher.submit(entry) for entry in entries))
        except asyncio.CancelledError:  # the client went away, or the deadline passed
            self._drop_cancelled(entries)
            raise
        finally:
            self.in_flight_items -= count
            self.observer.queued_items(self.spec.name, self.in_flight_items)
        for out in outs:
            if out.error is not None:
                raise out.error
        batched = time.perf_counter()
        if count == 1:  # one item: postprocess is cheap, no hand-off
            result = handler.postprocess(prepared, [outs[0].output])
        else:
            result = await self._off_loop(handler.postprocess, prepared, [o.output for o in outs])
        finished = time.perf_counter()
        outcome = InferenceOutcome(
            result=result,
            batch_size=max(o.batch_size for o in outs),
            timings={
                "preprocess": preprocessed - started,
                "queue": max(o.queue_s for o in outs),
                "compute": sum(o.compute_s for o in outs) / max(1, len(outs)),
                "postprocess": finished - batched,
                "total": finished - started,
            },
        )
        self.observer.inference_done(self.spec.name, prepared.items, outcome.timings)
        return outcome

    def _drop_cancelled(self, entries: Sequence[Entry]) -> None:
        """Take a cancelled request's items out of the batch queue; those in a running batch finish unused."""
        dropped = sum(entry.leave_queue("cancelled") for entry in entries)
        self.observer.items_cancelled(self.spec.name, dropped)
