"""Batch-size tuning: the batcher fills batches to the size that computes fastest per item."""

from __future__ import annotations

import asyncio
import random
import time

from hybridserve.server.engine.batching import AsyncBatcher
from hybridserve.server.engine.runtime import BatchOutput
from hybridserve.server.engine.tuning import EXPLORE_EVERY, BatchSizeTuner, candidate_sizes


def under_load(tuner: BatchSizeTuner, per_item_s, batches: int, noise: float = 0.0, seed: int = 0) -> list[int]:
    """A saturated model: every batch fills to what the tuner asks; returns the sizes that ran."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(batches):
        size = tuner.next_size()
        sizes.append(size)
        tuner.observe(size, size * per_item_s(size) * (1 + rng.uniform(-noise, noise)))
    return sizes


def cache_bound(size: int) -> float:
    """Per-item seconds of a CPU model whose batches beyond 3 outgrow the caches (as EfficientFormer here)."""
    return {1: 0.035, 2: 0.028, 3: 0.025}.get(size, 0.029)


def test_candidates_are_every_size_up_to_16_then_powers_of_two_and_halfway_sizes():
    assert candidate_sizes(1) == [1] and candidate_sizes(8) == list(range(1, 9))
    assert candidate_sizes(64) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert candidate_sizes(100) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 100]


def test_a_saturated_model_settles_on_its_cheapest_size_and_explores_rarely():
    tuner = BatchSizeTuner(8)
    under_load(tuner, cache_bound, 40, noise=0.02)
    assert tuner.best == 3
    later = under_load(tuner, cache_bound, 320, noise=0.02, seed=1)
    assert tuner.best == 3
    off_best = sum(size != 3 for size in later)
    assert off_best <= len(later) // EXPLORE_EVERY + 1, later


def test_where_bigger_batches_are_cheaper_the_ceiling_stays():
    tuner = BatchSizeTuner(16)
    sizes = under_load(tuner, lambda size: 0.002 + 0.01 / size, 200, noise=0.02)
    assert tuner.best == 16 and sizes[-1] == 16


def test_noise_alone_does_not_move_the_size():
    """Sizes that cost the same per item, give or take noise under the switch margin: the first
    choice holds."""
    tuner = BatchSizeTuner(8)
    under_load(tuner, lambda size: 0.01, 40, noise=0.01)
    first = tuner.best
    under_load(tuner, lambda size: 0.01, 400, noise=0.01, seed=3)
    assert tuner.best == first


def test_a_size_that_became_cheaper_is_found_again():
    tuner = BatchSizeTuner(8)
    under_load(tuner, cache_bound, 60)
    assert tuner.best == 3
    under_load(tuner, lambda size: 0.03 - 0.002 * size, 8 * EXPLORE_EVERY * 6)  # the machine changed: 8 wins now
    assert tuner.best == 8


def test_the_in_process_batcher_learns_the_size_from_the_batches_it_runs():
    """``AsyncBatcher`` with ``tune``: a model whose batches of 2 are cheapest per item, under a
    load that always has more than 8 items queued; the batcher serves batches of 2 once it has
    measured every size, and the answers stay in order."""
    ran: list[int] = []

    def run_batch(items):
        started = time.perf_counter()
        time.sleep(0.002 * len(items) if len(items) == 2 else 0.003 * len(items))
        ran.append(len(items))
        compute = time.perf_counter() - started
        return [BatchOutput(output=item * 10, batch_size=len(items), compute_s=compute) for item in items]

    batcher = AsyncBatcher(run_batch, max_batch_size=8, max_wait_ms=5, tune=True)

    async def client(start: int, count: int) -> list[int]:
        return [(await batcher.submit(i)).output for i in range(start, start + count)]

    async def scenario():
        return await asyncio.wait_for(asyncio.gather(*(client(1000 * c, 40) for c in range(12))), 60)

    answers = asyncio.run(scenario())
    assert answers == [[10 * i for i in range(1000 * c, 1000 * c + 40)] for c in range(12)]
    assert batcher.tuner.best == 2
    assert set(range(2, 9)) <= set(ran)  # every size was tried
    settled = ran[-60:]
    assert settled.count(2) >= len(settled) * 3 // 4, settled


def test_without_tune_or_with_a_latency_objective_the_batcher_does_not_tune():
    def run_batch(items):
        return list(items)

    assert AsyncBatcher(run_batch, 8, 5).tuner is None
    assert AsyncBatcher(run_batch, 8, 5, latency_slo_ms=100, tune=True).tuner is None
    assert AsyncBatcher(run_batch, 1, 5, tune=True).tuner is None
    assert AsyncBatcher(run_batch, 8, 5, tune=True).tuner.best == 8
