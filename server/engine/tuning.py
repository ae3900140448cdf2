"""Batch-size tuning: fill batches to the size, up to ``max_batch_size``, that computes fastest per item.

A bigger batch is not always cheaper per item. On CPU a batch whose activations outgrow the
caches can take longer per image: EfficientFormerV2-S0's eager forward on this project's 2-core
bench machine ran 38.7 images/s in batches of 3 and 34.1 in batches of 8 (median of 6 interleaved
rounds; docs/performance.md); CRAFT x4 took 4.1 s per
image in batches of 4 against 2.1 s alone. On a GPU the largest batch usually wins, and the
tuner then stays there. ``max_batch_size`` is the ceiling; ``BatchSizeTuner`` learns the rest
from the batches the model runs:

* the cost of a size is the median compute time per item of its last ``SAMPLES`` batches (the
  model's own timing of its forward, not the queue);
* while some size has fewer than ``FIRST_SAMPLES`` batches, every other batch fills to the
  smallest such size (a batch leaves with what is queued when its wait is over, so under light
  load this costs nothing: the batch is what it would have been);
* afterwards one batch in ``EXPLORE_EVERY`` fills to another size in turn, so every size's cost
  follows the machine's load;
* the fill size moves to a cheaper size only when that one is cheaper by ``SWITCH_MARGIN`` or
  more, so noise does not make it flap.

Ceilings up to ``ALL_SIZES_UP_TO`` try every size; larger ones powers of two and the sizes half
way between them. Used by ``batching.Batcher`` unless the spec sets ``batching.tune: false`` or a
latency objective (``AdaptiveBatchController`` then chooses the size).
"""

from __future__ import annotations

import statistics
from collections import deque

SAMPLES = 5
FIRST_SAMPLES = 2
EXPLORE_EVERY = 16
SWITCH_MARGIN = 0.03
ALL_SIZES_UP_TO = 16


def candidate_sizes(ceiling: int) -> list[int]:
    if ceiling <= ALL_SIZES_UP_TO:
        return list(range(1, ceiling + 1))
    sizes, size = {ceiling}, 1
    while size < ceiling:
        sizes.update((size, min(ceiling, size + size // 2)))
        size *= 2
    return sorted(sizes)


class BatchSizeTuner:
    """Learns the batch size with the lowest compute time per item (see the module's docstring)."""

    def __init__(self, ceiling: int):
        self.ceiling = max(1, ceiling)
        self.sizes = candidate_sizes(self.ceiling)
        self.best = self.ceiling
        self._recent = {size: deque(maxlen=SAMPLES) for size in self.sizes}
        self._turn = 0

    def observe(self, size: int, compute_s: float) -> None:
        """A batch of ``size`` items computed in ``compute_s`` seconds."""
        recent = self._recent.get(size)
        if recent is None or compute_s <= 0:  # a partial batch between candidate sizes
            return
        recent.append(compute_s / size)
        costs = self.costs()
        if not costs:
            return
        cheapest = min(costs, key=costs.get)
        current = costs.get(self.best)
        if current is None or costs[cheapest] <= current * (1 - SWITCH_MARGIN):
            self.best = cheapest

    def costs(self) -> dict[int, float]:
        """Seconds per item of each size measured ``FIRST_SAMPLES`` times or more."""
        return {size: statistics.median(recent) for size, recent in self._recent.items()
                if len(recent) >= FIRST_SAMPLES}

    def next_size(self) -> int:
        """How many items the next batch fills up to."""
        self._turn += 1
        unmeasured = [size for size, recent in self._recent.items() if len(recent) < FIRST_SAMPLES]
        if unmeasured:
            return unmeasured[0] if self._turn % 2 == 0 else self.best
        if self._turn % EXPLORE_EVERY == 0 and len(self.sizes) > 1:
            others = [size for size in self.sizes if size != self.best]
            return others[(self._turn // EXPLORE_EVERY) % len(others)]
        return self.best
