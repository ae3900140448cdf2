"""Dynamic batching: one queue per model, the same loop in-process and in front of a Ray hop.

Items wait until a batch's size (``max_batch_size``, or the tuner's, below) is queued or the
oldest has waited ``max_wait_ms``; when the queue is empty and nothing is computing, a lone item
goes at once (no fixed wait at concurrency 1), and while nothing computes half a batch goes as
soon as it is queued, from the request that completes it: the rest forms the next batch while
this one computes, so the model and the event loop (parsing, preprocess, answers) work side by
side instead of taking turns. A formed batch is handed to ``execute``, which starts it
*somewhere* and returns an awaitable of its results:

* ``AsyncBatcher`` (in-process): the model's forward on the batcher's own thread, so the event
  loop keeps decoding and queueing meanwhile;
* ``rayserve.remote.RayBatcher``: one Ray handle call per batch to the model's deployment (the
  per-batch hop).

Either way ``BATCHES_IN_FLIGHT`` batches may be under way: while one computes, a second (half a
batch or more) waits at the model (on the batch thread's queue, or travels to the replica), so
the model starts it the moment the first ends, without waiting for the event loop to hear of
it (a loop busy with requests answered that late; in-process, EfficientFormerV2-S0 eager at
c=32 in a Ray replica: 30.1 -> 33.6 images/s, 4 interleaved rounds) nor for the network.

With ``latency_slo_ms`` an ``AdaptiveBatchController`` re-chooses the batch size and wait after
every batch (``max_batch_size`` is then the ceiling); otherwise, with ``tune``, a
``tuning.BatchSizeTuner`` picks the size, up to ``max_batch_size``, that computes fastest per
item, from the compute times the model reports. Items whose caller has gone (their future is
cancelled) are dropped before dispatch.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from hybridserve.server.engine.adaptive import AdaptiveBatchController, BatchingChoice
from hybridserve.server.engine.cores import batch_thread
from hybridserve.server.engine.runtime import batch_cost
from hybridserve.server.engine.tuning import BatchSizeTuner

Execute = Callable[[list[Any]], Awaitable[Sequence[Any]]]
BATCHES_IN_FLIGHT = 2  # per model and batcher: the next batch waits at the model while one computes


class Batcher:
    def __init__(self, execute: Execute, max_batch_size: int, max_wait_ms: float,
                 latency_slo_ms: float | None = None, max_in_flight: int = 1, tune: bool = False):
        self._execute = execute
        self.max_batch_size = max_batch_size
        self._fill_to = max_batch_size  # this batch's size: max_batch_size, or the tuner's choice
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_in_flight = max_in_flight
        self.controller = None if latency_slo_ms is None else AdaptiveBatchController(
            latency_slo_ms, max_batch_size, BatchingChoice(max_batch_size, max_wait_ms))
        self.tuner = BatchSizeTuner(max_batch_size) if tune and self.controller is None and max_batch_size > 1 else None
        self._queue: list[tuple[Any, asyncio.Future, float]] = []
        self._in_flight: set[asyncio.Task] = set()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    def configure(self, max_batch_size: int, max_wait_ms: float) -> None:
        self.max_batch_size = self._fill_to = max_batch_size
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
        if self._ready_now():  # start it here: behind the loop's other ready tasks it would start late
            self._dispatch()
        self._wakeup.set()
        return await future

    async def _loop(self) -> None:
        """Batches that wait: for the wait budget, or for room while one computes."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue and self._room():
                await self._fill()
                if self._queue and self._room():
                    self._dispatch()
                if self.max_in_flight == 1 and self._in_flight:
                    await asyncio.wait(set(self._in_flight))

    def _ready_now(self) -> bool:
        """A batch may go without waiting: half a batch is queued, and the model is idle or the
        in-flight limit allows one more."""
        return len(self._queue) >= self._half() and len(self._in_flight) < self.max_in_flight

    def _half(self) -> int:
        """Half of this batch's size, and two items at least where the ceiling allows: a lone item does
        not overtake a running batch just because the tuner is trying batches of one."""
        return min(self.max_batch_size, max(2, (self._fill_to + 1) // 2))

    def _dispatch(self) -> None:
        """Start the next batch now (up to ``_fill_to`` queued items, cancelled ones dropped)."""
        waiting = len(self._queue)
        batch, self._queue = self._queue[: self._fill_to], self._queue[self._fill_to:]
        if self.tuner is not None:
            self._fill_to = self.tuner.next_size()
        batch = [(e, f, t) for e, f, t in batch if not f.cancelled()]
        if not batch:
            return
        results = self._execute([e for e, _, _ in batch])
        task = asyncio.get_running_loop().create_task(self._run(batch, waiting, results))
        self._in_flight.add(task)
        task.add_done_callback(functools.partial(self._finished, results))

    def _room(self) -> bool:
        """Another batch may go: none is in flight, or half a batch waits and the limit allows it.

        Only half batches or more overtake a running one: a lone item waits here, where its request's
        cancellation or deadline can still drop it, rather than in the model's queue."""
        if not self._in_flight:
            return True
        return len(self._in_flight) < self.max_in_flight and len(self._queue) >= self._half()

    def _finished(self, pending: Awaitable[Sequence[Any]], task: asyncio.Task) -> None:
        self._in_flight.discard(task)
        if task.cancelled() and asyncio.iscoroutine(pending):
            pending.close()  # the batch was cancelled before it started: its coroutine never ran
        if self._queue and self._ready_now() and not task.cancelled():
            self._dispatch()
        if self._wakeup is not None:
            self._wakeup.set()  # room for the next batch

    async def _run(self, batch: list[tuple[Any, asyncio.Future, float]], waiting: int,
                   pending: Awaitable[Sequence[Any]]) -> None:
        started = time.monotonic()
        try:
            results = await pending
        except asyncio.CancelledError:  # the batcher stops: nobody is left waiting
            for _, future, _ in batch:
                future.cancel()
            raise
        except Exception as exc:  # the whole batch failed: every caller sees it
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        if self.controller is not None:
            choice = self.controller.observe(len(batch), time.monotonic() - started,
                                             [started - t for _, _, t in batch], waiting)
            self.configure(choice.max_batch_size, choice.max_wait_ms)
        elif self.tuner is not None and (cost := batch_cost(results)) is not None:
            self.tuner.observe(*cost)
        for (_, future, _), result in zip(batch, results):
            if not future.done():
                future.set_result(result)

    async def _fill(self) -> None:
        """Wait for a full batch or until the oldest item has waited ``max_wait_ms`` (time spent behind
        a running batch counts), whichever first; a lone item goes at once."""
        if len(self._queue) >= self._fill_to or self.max_wait_s <= 0:
            return
        deadline = self._queue[0][2] + self.max_wait_s
        size = len(self._queue)
        # Yield once so requests already in flight on the loop can join this batch.
        await asyncio.sleep(0)
        while len(self._queue) < self._fill_to and self._room():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (size == 1 and len(self._queue) == 1 and not self._in_flight):
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return
            size = len(self._queue)


class AsyncBatcher(Batcher):
    """In-process: ``run_batch`` (a plain function) computes each batch on the batcher's own thread;
    the second batch in flight waits on that thread's queue.

    Batches get their own thread: in the shared default executor they would queue behind every
    request's preprocess and postprocess hops (a tail-latency source). With ``pin`` (the model's
    torch threads) that thread runs on as many cores of its own where they are free (engine/cores.py)."""

    def __init__(self, run_batch: Callable[[Sequence[Any]], list[Any]], max_batch_size: int, max_wait_ms: float,
                 latency_slo_ms: float | None = None, tune: bool = False, pin: int = 0):
        self._thread, _ = batch_thread(pin)

        def execute(entries: list[Any]) -> Awaitable[Sequence[Any]]:  # starts on the thread at once
            return asyncio.get_running_loop().run_in_executor(self._thread, run_batch, entries)

        super().__init__(execute, max_batch_size, max_wait_ms, latency_slo_ms, BATCHES_IN_FLIGHT, tune)
