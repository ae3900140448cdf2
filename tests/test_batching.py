"""The in-process batcher (used without Ray), the runtime's batched step, and where preprocess runs."""

from __future__ import annotations

import asyncio
import gc
import io
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from hybridserve.models import LoadedModel
from hybridserve.server.core.images import header_pixels
from hybridserve.server.core.spec import ModelSpec
from hybridserve.server.engine.batching import AsyncBatcher, Batcher
from hybridserve.server.tasks import InferenceRequest
from hybridserve.server.tasks.classification import ClassificationHandler


def recording_model(delay_s: float = 0.01):
    batches: list[int] = []
    active = threading.Lock()

    def run_batch(items):
        assert active.acquire(blocking=False), "two batches computed at once"
        try:
            batches.append(len(items))
            time.sleep(delay_s)
            return [item * 10 for item in items]
        finally:
            active.release()

    return run_batch, batches


def test_a_lone_request_runs_at_once():
    run_batch, batches = recording_model()
    batcher = AsyncBatcher(run_batch, max_batch_size=8, max_wait_ms=1000)

    async def one():
        started = time.monotonic()
        result = await batcher.submit(3)
        return result, time.monotonic() - started

    result, elapsed = asyncio.run(one())
    assert result == 30 and batches == [1]
    assert elapsed < 0.5  # the 1 s wait budget was not spent on an empty queue


def test_concurrent_items_form_batches_in_order_and_respect_the_maximum():
    run_batch, batches = recording_model()
    batcher = AsyncBatcher(run_batch, max_batch_size=4, max_wait_ms=50)

    async def many():
        return await asyncio.gather(*(batcher.submit(i) for i in range(10)))

    assert asyncio.run(many()) == [i * 10 for i in range(10)]
    assert sum(batches) == 10 and max(batches) == 4 and len(batches) < 10


def test_half_a_batch_starts_at_once_on_an_idle_model_and_the_rest_forms_behind_it():
    """The model and the event loop work side by side: a burst's first half computes while the loop
    queues the rest; the next half batch waits at the model behind it, the rest goes when one of them
    ends; nobody waits for the (long) wait budget."""
    run_batch, batches = recording_model(delay_s=0.05)
    batcher = AsyncBatcher(run_batch, max_batch_size=8, max_wait_ms=60_000)

    async def scenario():
        first = [asyncio.ensure_future(batcher.submit(i)) for i in range(4)]
        await asyncio.sleep(0)  # half a batch queued, the model idle: it goes now
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(4, 12)]  # queued while it computes
        return await asyncio.wait_for(asyncio.gather(*first, *rest), 5.0)

    assert asyncio.run(scenario()) == [i * 10 for i in range(12)]
    assert batches == [4, 4, 4]


def test_before_a_hop_a_second_half_batch_travels_while_one_computes():
    """``RayBatcher``'s two batches in flight: half a batch is enough to go behind a running one."""
    running, most, batches = [0], [0], []

    async def execute(items):
        running[0] += 1
        most[0] = max(most[0], running[0])
        batches.append(len(items))
        await asyncio.sleep(0.05)
        running[0] -= 1
        return [item * 10 for item in items]

    batcher = Batcher(execute, max_batch_size=8, max_wait_ms=200, max_in_flight=2)

    async def scenario():
        first = [asyncio.ensure_future(batcher.submit(i)) for i in range(4)]
        await asyncio.sleep(0)
        second = [asyncio.ensure_future(batcher.submit(i)) for i in range(4, 8)]
        await asyncio.sleep(0)
        third = [asyncio.ensure_future(batcher.submit(i)) for i in range(8, 10)]  # no room: waits for one
        return await asyncio.wait_for(asyncio.gather(*first, *second, *third), 5.0)

    assert asyncio.run(scenario()) == [i * 10 for i in range(10)]
    assert batches == [4, 4, 2] and most[0] == 2


def timed_model(delay_s: float):
    """A model that computes each batch in ``delay_s`` and records when each batch ran."""
    spans: list[tuple[float, float]] = []

    def run_batch(items):
        started = time.monotonic()
        time.sleep(delay_s)
        spans.append((started, time.monotonic()))
        return [item * 10 for item in items]

    return run_batch, spans


def test_in_process_the_next_batch_starts_when_one_ends_even_while_the_loop_is_busy():
    """The second batch waits on the batch thread's queue: when the first ends, the thread starts it
    at once, though the event loop (which would hear of the end) is busy with other work."""
    run_batch, spans = timed_model(0.3)
    batcher = AsyncBatcher(run_batch, max_batch_size=8, max_wait_ms=1000)

    async def scenario():
        first = [asyncio.ensure_future(batcher.submit(i)) for i in range(4)]  # half a batch: goes at once
        await asyncio.sleep(0.05)
        second = [asyncio.ensure_future(batcher.submit(i)) for i in range(4, 8)]  # half a batch behind it
        await asyncio.sleep(0.05)
        time.sleep(0.6)  # the loop is busy past the first batch's end
        return await asyncio.wait_for(asyncio.gather(*first, *second), 10.0)

    assert asyncio.run(scenario()) == [i * 10 for i in range(8)]
    assert len(spans) == 2
    assert spans[1][0] - spans[0][1] < 0.1  # one batch in flight would start it after the loop's 0.6 s


def test_the_wait_budget_counts_from_the_oldest_item_even_behind_a_running_batch():
    """Items that queued while a batch computed have waited already: when the model frees, they go
    at once rather than start a fresh ``max_wait_ms`` then."""
    run_batch, spans = timed_model(0.6)
    batcher = AsyncBatcher(run_batch, max_batch_size=8, max_wait_ms=400)

    async def scenario():
        lone = asyncio.ensure_future(batcher.submit(0))  # goes at once
        await asyncio.sleep(0.05)
        behind = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]  # under half: they wait
        return await asyncio.wait_for(asyncio.gather(lone, *behind), 10.0)

    assert asyncio.run(scenario()) == [0, 10, 20]
    assert len(spans) == 2
    # They had waited 0.55 s of their 0.4 s when the model freed: no fresh 0.4 s wait then.
    assert spans[1][0] - spans[0][1] < 0.3


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_partial_batch_leaves_when_its_wait_is_over_on_either_event_loop(loop):
    """uvloop (Ray's replicas, ``--no-ray``) may run a timer before its own clock reaches the deadline:
    the batch must go on the timer's word, or a burst with nothing after it waits for ever."""
    uvloop = pytest.importorskip("uvloop") if loop == "uvloop" else None
    run_batch, batches = recording_model(delay_s=0.0)
    batcher = AsyncBatcher(run_batch, max_batch_size=8, max_wait_ms=3)

    async def bursts():
        for size in (3, 2, 5) * 20:  # partial batches, one burst at a time, nothing in between
            assert await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in range(size))), 5.0) \
                == [i * 10 for i in range(size)]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop else None) as runner:
        runner.run(bursts())
    assert sum(batches) == 200


def test_reconfigure_changes_the_batch_size_in_place():
    run_batch, batches = recording_model()
    batcher = AsyncBatcher(run_batch, max_batch_size=2, max_wait_ms=50)
    batcher.configure(max_batch_size=6, max_wait_ms=50)

    async def many():
        return await asyncio.gather(*(batcher.submit(i) for i in range(6)))

    asyncio.run(many())
    assert max(batches) > 2


def test_a_failing_batch_fails_its_callers_and_the_batcher_goes_on():
    calls = []

    def run_batch(items):
        calls.append(list(items))
        if any(item < 0 for item in items):
            raise RuntimeError("boom")
        return list(items)

    batcher = AsyncBatcher(run_batch, max_batch_size=1, max_wait_ms=0)

    async def scenario():
        with pytest.raises(RuntimeError):
            await batcher.submit(-1)
        return await batcher.submit(5)

    assert asyncio.run(scenario()) == 5


def test_a_batch_cancelled_before_it_starts_leaves_no_unawaited_hop_behind():
    """Shutdown cancels a batch task that has not started yet (``asyncio.run`` cancels what is
    left): the hop's coroutine is closed, not left to warn that it was never awaited."""
    calls = []

    async def execute(items):
        calls.append(items)
        return items

    batcher = Batcher(execute, max_batch_size=1, max_wait_ms=0)

    async def scenario():
        submit = batcher.submit(1)
        submit.send(None)  # runs up to its wait: its batch is dispatched, the batch task not started
        for task in asyncio.all_tasks():  # as a shutdown does
            if task is not asyncio.current_task():
                task.cancel()
        submit.close()
        await asyncio.sleep(0)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        asyncio.run(scenario())
        gc.collect()
    assert calls == []
    assert not [w for w in seen if "never awaited" in str(w.message)], [str(w.message) for w in seen]


def test_small_images_preprocess_on_the_event_loop_and_large_ones_on_a_thread():
    """``Endpoint`` preprocesses inline only where the header says the image is small."""
    def png(width: int, height: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("L", (width, height), 128).save(buffer, format="PNG")  # flat: a few hundred bytes at any size
        return buffer.getvalue()

    def handler(input_size):
        spec = ModelSpec.model_validate({"name": "m", "task": "classification", "architecture": "x",
                                         "labels": ["a", "b"], "preprocessing": {"input_size": input_size}})
        return ClassificationHandler(spec, LoadedModel(torch.nn.Identity(), "x"), torch.device("cpu"))

    small, large = png(32, 32), png(4000, 3000)
    assert header_pixels(small) == 32 * 32 and header_pixels(large) == 12_000_000 and header_pixels(b"junk") is None
    assert len(large) < 64 * 1024  # few bytes, many pixels: the header decides, not the size on the wire
    digits = handler([32, 32])
    assert digits.preprocess_inline(InferenceRequest(small))
    assert not digits.preprocess_inline(InferenceRequest(large))
    assert not digits.preprocess_inline(InferenceRequest(b"junk"))  # decode on the thread says what is wrong
    assert digits.preprocess_inline(InferenceRequest(np.zeros((64, 64, 3), np.uint8)))
    assert not handler([512, 512]).preprocess_inline(InferenceRequest(small))  # a large model input
