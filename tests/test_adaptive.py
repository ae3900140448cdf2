"""Adaptive batching: the controller's choices from measured costs, and the in-process batcher using it.

Costs are fed as numbers (a batch of b items costing 2 ms + 1 ms per item, the shape measured
for small models here) so the expected choice follows by arithmetic; the batcher test runs a
real sleeping workload and checks the structure of the choice, never the wall-clock time.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from hybridserve.server.engine.adaptive import AdaptiveBatchController, BatchingChoice
from hybridserve.server.engine.batching import AsyncBatcher


def cost_s(size: int) -> float:
    return 0.002 + 0.001 * size


def feed(controller: AdaptiveBatchController, sizes, waiting: int, wait_s: float = 0.0) -> BatchingChoice:
    choice = controller.choice
    for size in sizes:
        choice = controller.observe(size, cost_s(size), [wait_s] * size, waiting)
    return choice


def test_the_batch_size_is_the_largest_whose_two_batches_fit_the_objective():
    controller = AdaptiveBatchController(latency_slo_ms=20.0, ceiling=64)
    choice = feed(controller, [1, 4, 8, 16, 8, 4], waiting=100)
    # 2 * (2 ms + 1 ms * b) <= 20 ms  ->  b <= 8
    assert choice.max_batch_size == 8
    assert abs(controller.batch_cost_s(8) - cost_s(8)) < 1e-9
    state = controller.state()
    assert state["max_batch_size"] == 8 and state["overloaded"] and state["batches"] == 6
    assert abs(state["batch_fixed_ms"] - 2.0) < 1e-6 and abs(state["batch_per_item_ms"] - 1.0) < 1e-6


def test_a_looser_objective_allows_larger_batches_up_to_the_ceiling():
    tight, loose, capped = (AdaptiveBatchController(slo, ceiling) for slo, ceiling in ((20.0, 64), (60.0, 64), (60.0, 16)))
    sizes = [2, 4, 8, 16]
    assert feed(tight, sizes, 100).max_batch_size < feed(loose, sizes, 100).max_batch_size == 28
    assert feed(capped, sizes, 100).max_batch_size == 16


def test_batches_that_cost_more_per_item_are_not_chosen():
    controller = AdaptiveBatchController(latency_slo_ms=60_000.0, ceiling=8)
    choice = controller.choice
    for size in [8, 4, 2, 1] * 3:  # memory-bound: a batch of b takes b ** 1.5 seconds
        choice = controller.observe(size, size ** 1.5, [0.0] * size, waiting=50)
    assert controller.most_efficient() == 1 and choice.max_batch_size == 1
    assert controller.state()["most_efficient_batch"] == 1


def test_one_request_at_a_time_gets_no_batch_wait():
    controller = AdaptiveBatchController(latency_slo_ms=50.0, ceiling=32, initial=BatchingChoice(32, 10.0))
    for step in range(5):
        controller.arrival(now=step * 0.01)
    choice = feed(controller, [1] * 5, waiting=1)
    assert choice == BatchingChoice(1, 0.0)


def test_batches_do_not_outgrow_the_demand_and_the_wait_follows_arrivals():
    controller = AdaptiveBatchController(latency_slo_ms=100.0, ceiling=64)
    for step in range(20):
        controller.arrival(now=step * 0.0005)  # one item every 0.5 ms
    choice = feed(controller, [4, 6, 6, 5], waiting=6)
    assert choice.max_batch_size == 6  # the objective would allow 48, but only 6 items ever wait
    assert 0 < choice.max_wait_ms <= 5 * 0.5 + 1e-6  # about the time five more arrivals take


def test_the_wait_never_exceeds_one_batch_of_compute():
    controller = AdaptiveBatchController(latency_slo_ms=100.0, ceiling=64)
    for step in range(20):
        controller.arrival(now=step * 0.010)  # sparse arrivals: five more would take 50 ms
    choice = feed(controller, [4, 6, 6, 5], waiting=6)
    assert choice.max_batch_size == 6 and abs(choice.max_wait_ms - 1000 * cost_s(6)) < 1e-6


def test_headroom_is_cut_when_p99_exceeds_the_objective_and_recovers_when_it_is_met():
    controller = AdaptiveBatchController(latency_slo_ms=20.0, ceiling=64)
    before = feed(controller, [4, 8] * 16, waiting=8, wait_s=0.030)  # every item took > 30 ms
    assert controller.headroom < 1.0
    assert controller.state()["p99_ms"] > 20.0
    shrunk = feed(controller, [4, 8] * 16, waiting=8, wait_s=0.030)
    assert shrunk.max_batch_size <= before.max_batch_size
    cut = controller.headroom
    feed(controller, [4, 8] * 48, waiting=8, wait_s=0.0)
    assert controller.headroom > cut


def test_overload_does_not_shrink_batches():
    controller = AdaptiveBatchController(latency_slo_ms=20.0, ceiling=64)
    feed(controller, [8] * 64, waiting=200, wait_s=0.5)  # a backlog far beyond one batch
    assert controller.headroom == 1.0 and controller.state()["overloaded"]


def test_the_in_process_batcher_follows_the_controller():
    batches: list[int] = []

    def run_batch(items):
        batches.append(len(items))
        time.sleep(cost_s(len(items)))
        return [item * 2 for item in items]

    batcher = AsyncBatcher(run_batch, max_batch_size=64, max_wait_ms=5.0, latency_slo_ms=24.0)

    async def client(index: int) -> list[int]:
        return [await batcher.submit(index * 100 + step) for step in range(12)]

    async def load():
        return await asyncio.gather(*(client(i) for i in range(48)))

    results = asyncio.run(load())
    assert results == [[(i * 100 + s) * 2 for s in range(12)] for i in range(48)]
    state = batcher.controller.state()
    assert state["batches"] == len(batches) and state["batch_per_item_ms"] is not None
    # 2 * (2 ms + 1 ms * b) <= 24 ms gives b <= 10 for the nominal cost; a slower machine gives less.
    assert 1 <= batcher.max_batch_size == state["max_batch_size"] <= 10
    assert batcher.max_wait_s * 1000.0 == pytest.approx(state["max_wait_ms"]) and state["max_wait_ms"] <= 24.0
    assert max(batches[len(batches) // 2:]) <= 10  # once measured, no batch outgrows the objective
