"""The in-process batcher (used without Ray) and the runtime's batched step."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from hybridserve.server.engine.batching import AsyncBatcher


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
