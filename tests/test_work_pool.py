"""Pre/postprocess off the event loop run on the serving process's own small pool, not asyncio's default."""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from hybridserve.server.engine.local import local_plane
from hybridserve.server.repository import builtin_repository, load_spec
from hybridserve.server.tasks import InferenceRequest


def test_concurrent_requests_preprocess_on_the_one_work_thread():
    """Full-reference requests never preprocess inline: 16 at once all go through one work thread,
    and asyncio's default pool (CPUs + 4 threads, each contending for the GIL) is never started."""
    plane = local_plane([load_spec(builtin_repository() / "psnr.yaml")])
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
             for _ in range(16)]
    before = {t.ident for t in threading.enumerate()}

    async def serve() -> list[float]:
        outcomes = await asyncio.gather(*(plane.infer("psnr", None, InferenceRequest(image=a, reference=b))
                                          for a, b in pairs))
        return [outcome.result for outcome in outcomes]

    results = asyncio.run(serve())
    assert len(results) == 16 and all(result is not None for result in results)
    started = [t.name for t in threading.enumerate() if t.ident not in before]
    assert [name for name in started if name.startswith("hybridserve-work")] == ["hybridserve-work_0"]
    assert not [name for name in started if name.startswith("asyncio")], started
