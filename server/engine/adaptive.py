"""Adaptive batching: pick the batch size and batch wait at run time to meet a latency objective.

Used when a spec sets ``batching.latency_slo_ms``, by the in-process ``AsyncBatcher`` and by
the Ray deployment (through ``set_max_batch_size`` / ``set_batch_wait_timeout_s``).

The controller keeps three measurements, all from live batches:

* a cost model ``t(b) = a + c·b`` of one batch's compute time, fitted to the mean time of
  each batch size seen (with one size seen, ``t`` is taken as proportional to ``b``, which
  overestimates larger batches: the safe side);
* the demand: how many items were waiting when a batch left (largest over the last batches);
* the p99 of the items' time from queueing to the end of their batch.

The choice: an item may wait for the batch in flight, then for its own batch to fill, then
for its own batch to compute, so the largest batch ``B`` with ``2·t(B) <= h·SLO`` is allowed,
but no larger than the demand (a batch that cannot fill only waits), and no larger than a
size whose measured cost per item is beaten by a smaller batch (batching can lose: CRAFT x4
took 4.1 s per image in batches of 4 against 2.1 s alone on this project's CPU). The wait is what is left
of the budget, no longer than the expected time for ``B - 1`` more arrivals nor than one
batch's compute time (waiting longer for stragglers costs more than running a second batch),
and zero when requests come one at a time. ``h`` (headroom) is adjusted AIMD-style, as in Clipper: cut by a
quarter when the measured p99 exceeds the objective, raised by 5 % of the objective while it
stays under 80 % of it. Under overload (more items waiting than the largest allowed batch)
the headroom is not cut: smaller batches would only lower throughput, and the queue limit
(``max_queue``, 503) is what bounds latency there.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

EWMA = 0.2  # weight of a new sample in moving averages
WINDOW = 32  # batches per AIMD step and per demand estimate
MIN_HEADROOM, DECREASE, INCREASE = 0.2, 0.75, 0.05
MIN_SAMPLES = 3  # batches of a size before its cost can cap the batch size


@dataclass(frozen=True)
class BatchingChoice:
    max_batch_size: int
    max_wait_ms: float


class AdaptiveBatchController:
    """Chooses ``(max_batch_size, max_wait_ms)`` from measured compute times and demand."""

    def __init__(self, latency_slo_ms: float, ceiling: int, initial: BatchingChoice | None = None):
        self.slo_s = latency_slo_ms / 1000.0
        self.ceiling = max(1, ceiling)
        first = initial or BatchingChoice(self.ceiling, 0.0)
        self.choice = BatchingChoice(min(first.max_batch_size, self.ceiling), min(first.max_wait_ms, latency_slo_ms / 2))
        self.headroom = 1.0
        self._cost_s: dict[int, float] = {}
        self._samples: dict[int, int] = {}
        self._demand: deque[int] = deque(maxlen=WINDOW)
        self._latencies: deque[float] = deque(maxlen=WINDOW * 8)
        self._gap_s: float | None = None
        self._last_arrival: float | None = None
        self._batches = 0
        self._p99_s: float | None = None
        self._overloaded = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------ measurements

    def arrival(self, now: float | None = None) -> None:
        """An item joined the queue (feeds the inter-arrival estimate)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._last_arrival is not None:
                gap = max(0.0, now - self._last_arrival)
                self._gap_s = gap if self._gap_s is None else (1 - EWMA) * self._gap_s + EWMA * gap
            self._last_arrival = now

    def observe(self, batch_size: int, compute_s: float, queue_waits_s: Sequence[float], waiting: int) -> BatchingChoice:
        """One finished batch: its size, compute time, its items' queue waits, and the items waiting at dispatch."""
        with self._lock:
            previous = self._cost_s.get(batch_size)
            self._cost_s[batch_size] = compute_s if previous is None else (1 - EWMA) * previous + EWMA * compute_s
            self._samples[batch_size] = self._samples.get(batch_size, 0) + 1
            self._demand.append(max(waiting, batch_size))
            self._latencies.extend(wait + compute_s for wait in queue_waits_s)
            self._batches += 1
            if self._batches % WINDOW == 0:
                self._adjust_headroom()
            self.choice = self._decide()
            return self.choice

    # ------------------------------------------------------------ decisions

    def batch_cost_s(self, size: int) -> float | None:
        """Predicted compute time of a batch of ``size`` (None before any batch was seen)."""
        fixed, per_item = self._fit()
        return None if per_item is None else fixed + per_item * size

    def _fit(self) -> tuple[float, float | None]:
        if not self._cost_s:
            return 0.0, None
        if len(self._cost_s) == 1:
            (size, cost), = self._cost_s.items()
            return 0.0, cost / size
        sizes, costs = list(self._cost_s), list(self._cost_s.values())
        mean_b, mean_t = sum(sizes) / len(sizes), sum(costs) / len(costs)
        spread = sum((b - mean_b) ** 2 for b in sizes)
        slope = max(0.0, sum((b - mean_b) * (t - mean_t) for b, t in zip(sizes, costs)) / spread)
        fixed = max(0.0, mean_t - slope * mean_b)
        if slope == 0.0:  # noise made larger batches look free: fall back to the proportional model
            return 0.0, max(t / b for b, t in self._cost_s.items())
        return fixed, slope

    def most_efficient(self) -> int:
        """The ceiling, or the batch size beyond which measured batches cost more per item (10 % or more).

        Batching is not always a gain: a memory-bound model on CPU can take longer per image
        in a batch of 4 than alone. Only sizes seen at least ``MIN_SAMPLES`` times count.
        """
        seen = {size: cost / size for size, cost in self._cost_s.items() if self._samples[size] >= MIN_SAMPLES}
        if not seen:
            return self.ceiling
        best = min(seen, key=seen.get)
        worse_above = any(size > best and per_item > 1.1 * seen[best] for size, per_item in seen.items())
        return best if worse_above else self.ceiling

    def _decide(self) -> BatchingChoice:
        fixed, per_item = self._fit()
        budget = self.headroom * self.slo_s
        allowed = 1
        for size in range(self.most_efficient(), 0, -1):
            if 2 * (fixed + per_item * size) <= budget + 1e-9:
                allowed = size
                break
        demand = max(self._demand)
        self._overloaded = demand > allowed
        size = max(1, min(allowed, demand))
        if demand <= 1:
            return BatchingChoice(size, 0.0)
        cost = fixed + per_item * size
        left = max(0.0, budget - 2 * cost)
        fill = (size - 1) * self._gap_s if self._gap_s is not None else 0.0
        return BatchingChoice(size, round(min(left, fill, cost) * 1000.0, 3))

    def _adjust_headroom(self) -> None:
        ordered = sorted(self._latencies)
        self._p99_s = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
        if self._p99_s > self.slo_s and not self._overloaded:
            self.headroom = max(MIN_HEADROOM, self.headroom * DECREASE)
        elif self._p99_s < 0.8 * self.slo_s:
            self.headroom = min(1.0, self.headroom + INCREASE)

    # ------------------------------------------------------------ reporting

    def state(self) -> dict[str, Any]:
        """The live choice and what it was made from (for metrics and ``GET /v1/models``)."""
        with self._lock:
            fixed, per_item = self._fit()
            return {
                "latency_slo_ms": self.slo_s * 1000.0,
                "max_batch_size": self.choice.max_batch_size,
                "max_wait_ms": self.choice.max_wait_ms,
                "headroom": round(self.headroom, 3),
                "p99_ms": None if self._p99_s is None else round(self._p99_s * 1000.0, 3),
                "demand": max(self._demand, default=0),
                "overloaded": self._overloaded,
                "batch_fixed_ms": round(fixed * 1000.0, 3),
                "batch_per_item_ms": None if per_item is None else round(per_item * 1000.0, 3),
                "arrival_gap_ms": None if self._gap_s is None else round(self._gap_s * 1000.0, 3),
                "most_efficient_batch": self.most_efficient(),
                "batches": self._batches,
            }
