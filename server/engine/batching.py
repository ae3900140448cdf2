"""Dynamic batching for in-process serving (no Ray), with the semantics of ``@serve.batch``.

Items wait until ``max_batch_size`` are queued or the oldest has waited ``max_wait_ms``;
when the queue is empty and the worker idle, a lone item runs at once (no fixed wait at
concurrency 1). One batch computes at a time, in the batcher's own thread, so the event loop
keeps decoding and queueing the next batch meanwhile. Under Ray the deployment uses
``@serve.batch`` instead; both call the same ``run_batch``.

With ``latency_slo_ms`` an ``AdaptiveBatchController`` re-chooses the batch size and wait
after every batch (``max_batch_size`` is then the ceiling).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hybridserve.server.engine.adaptive import AdaptiveBatchController, BatchingChoice


class AsyncBatcher:
    def __init__(self, run_batch: Callable[[Sequence[Any]], list[Any]], max_batch_size: int, max_wait_ms: float,
                 latency_slo_ms: float | None = None):
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.controller = None if latency_slo_ms is None else AdaptiveBatchController(
            latency_slo_ms, max_batch_size, BatchingChoice(max_batch_size, max_wait_ms))
        self._queue: list[tuple[Any, asyncio.Future, float]] = []
        # Batches run on their own thread: in the shared default executor they would queue
        # behind every request's preprocess and postprocess hops (a tail-latency source).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridserve-batch")
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    def configure(self, max_batch_size: int, max_wait_ms: float) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0

    async def submit(self, entry: Any) -> Any:
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._loop())
        future = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        self._queue.append((entry, future, now))
        if self.controller is not None:
            self.controller.arrival(now)
        self._wakeup.set()
        return await future

    async def _loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                await self._fill()
                waiting = len(self._queue)
                batch, self._queue = self._queue[: self.max_batch_size], self._queue[self.max_batch_size :]
                batch = [(e, f, t) for e, f, t in batch if not f.cancelled()]
                if not batch:
                    continue
                started = time.monotonic()
                try:
                    results = await asyncio.get_running_loop().run_in_executor(
                        self._executor, self._run_batch, [e for e, _, _ in batch])
                except Exception as exc:  # the whole batch failed: every caller sees it
                    for _, future, _ in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                if self.controller is not None:
                    choice = self.controller.observe(len(batch), time.monotonic() - started,
                                                     [started - t for _, _, t in batch], waiting)
                    self.configure(choice.max_batch_size, choice.max_wait_ms)
                for (_, future, _), result in zip(batch, results):
                    if not future.done():
                        future.set_result(result)

    async def _fill(self) -> None:
        """Wait for a full batch or the wait budget, whichever first; a lone item goes at once."""
        if len(self._queue) >= self.max_batch_size or self.max_wait_s <= 0:
            return
        deadline = time.monotonic() + self.max_wait_s
        size = len(self._queue)
        # Yield once so requests already in flight on the loop can join this batch.
        await asyncio.sleep(0)
        while len(self._queue) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (size == 1 and len(self._queue) == 1):
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return
            size = len(self._queue)
