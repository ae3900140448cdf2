"""In-process measurements: the limit, compile speed-ups, a request's own cost, cold and warm starts.

* limit: the loaded (compiled) model's batched forward called directly, at every batch size up
  to the spec's maximum, best of interleaved rounds; the best images/s is the ceiling any
  server can reach; measured again, at the best sizes, in every round of the server
  measurements (``round_limit``), so a ratio to the limit compares what was measured together;
* pipeline: one request's whole in-process path (JSON + base64 + decode + preprocess +
  forward at batch 1 + postprocess + JSON), the floor of a server's latency at concurrency 1;
* compile table: ms per batch for each backend at two batch sizes, rounds interleaved;
* cold/warm start: ``python -m benchmarks.inprocess start SPEC`` in a fresh process, first with
  empty compile caches, then again with the caches it filled.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.workloads import ROOT, Workload, write_repository
from hybridserve.server.tasks import TASKS, InferenceRequest, Options
from hybridserve.server.engine.cores import pinning_on
from hybridserve.server.engine.runtime import ModelRuntime, configure_threads
from hybridserve.server.engine.tuning import candidate_sizes
from hybridserve.server.core.spec import ModelSpec
from hybridserve.server.repository import load_spec


def load_runtime(spec: ModelSpec) -> ModelRuntime:
    runtime = ModelRuntime(spec)
    runtime.load()
    if runtime.status != "ready":
        raise RuntimeError(f"{spec.name} failed to load: {runtime.reason}")
    return runtime


def _request(workload: Workload) -> InferenceRequest:
    return InferenceRequest(image=base64.b64decode(json.loads(workload.payload)["image"]))


@contextlib.contextmanager
def pinned(threads: int):
    """This thread on the highest-numbered ``threads`` cores while it measures, as a server pins its
    batch threads (server/engine/cores.py); as it was afterwards."""
    allowed = os.sched_getaffinity(0)
    if threads >= len(allowed) or not pinning_on():
        yield
        return
    os.sched_setaffinity(0, sorted(allowed)[-threads:])
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def seconds_per_call(call, min_calls: int, min_seconds: float) -> float:
    """Median wall time of ``call()`` after one warm call, over at least ``min_calls`` and ``min_seconds``,
    on the cores a server would pin the model's batch thread to."""
    with pinned(torch.get_num_threads()):
        call()
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < min_calls or time.perf_counter() - started < min_seconds:
            begin = time.perf_counter()
            call()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def limit(runtime: ModelRuntime, workload: Workload, min_seconds: float, rounds: int = 3) -> dict[int, float]:
    """Images/s of the batched forward at each batch size: the best of interleaved rounds (a ceiling)."""
    handler = runtime.handler
    item = handler.preprocess(_request(workload)).items[0]
    best: dict[int, float] = {}
    with torch.inference_mode():
        for _ in range(rounds):
            # The sizes a server's batch-size tuner tries (every size up to 16): the ceiling covers its choices.
            for size in candidate_sizes(runtime.spec.batching.max_batch_size):
                rate = size / seconds_per_call(lambda: handler.forward([item] * size), 3, min_seconds)
                best[size] = max(best.get(size, 0.0), rate)
    return best


def round_limit(runtime: ModelRuntime, workload: Workload, sizes: list[int], min_seconds: float) -> float:
    """The best images/s over ``sizes`` right now: the limit measured again beside a round of servers."""
    item = runtime.handler.preprocess(_request(workload)).items[0]
    with torch.inference_mode():
        return max(size / seconds_per_call(lambda: runtime.handler.forward([item] * size), 3, min_seconds)
                   for size in sizes)


def pipeline_seconds(runtime: ModelRuntime, workload: Workload, min_seconds: float) -> float:
    handler = runtime.handler

    def one() -> None:
        body = json.loads(workload.payload)
        prepared = handler.preprocess(InferenceRequest(image=base64.b64decode(body["image"])))
        output = handler.postprocess(prepared, handler.forward(prepared.items))
        TASKS[handler.spec.task].typed(handler.spec, output, Options()).model_dump_json()

    with torch.inference_mode():
        return seconds_per_call(one, 3, min_seconds)


def compile_table(workload: Workload, backends: list[str], rounds: int, min_seconds: float) -> dict[str, dict[int, float]]:
    """Median ms per batch for each backend and batch size, the backends interleaved in every round."""
    runtimes = {backend: load_runtime(workload.spec_for(backend, "compile-table")) for backend in backends}
    samples: dict[str, dict[int, list[float]]] = {b: {n: [] for n in workload.compile_batches} for b in backends}
    for _ in range(rounds):
        for backend, runtime in runtimes.items():
            item = runtime.handler.preprocess(_request(workload)).items[0]
            for size in workload.compile_batches:
                with torch.inference_mode():
                    seconds = seconds_per_call(lambda: runtime.handler.forward([item] * size), 3, min_seconds)
                samples[backend][size].append(1000.0 * seconds)
    chosen = {backend: runtime.backend for backend, runtime in runtimes.items()}
    return {f"{backend}" + ("" if chosen[backend] == backend else f" (served as {chosen[backend]})"):
            {size: statistics.median(values) for size, values in by_size.items()}
            for backend, by_size in samples.items()}


def cold_and_warm_start(workload: Workload, backend: str, folder: Path) -> dict[str, dict]:
    """Load the model in a fresh process twice: empty caches (cold), then the caches it filled (warm)."""
    spec_file = next(write_repository(folder / "start-repo", [workload.spec_for(backend)]).glob("*.yaml"))
    with tempfile.TemporaryDirectory(dir=folder) as caches:
        env = {**os.environ, "HYBRIDSERVE_CACHE": f"{caches}/hybridserve", "TORCHINDUCTOR_CACHE_DIR": f"{caches}/inductor",
               "HF_HUB_OFFLINE": "1"}
        results = {}
        for phase in ("cold", "warm"):
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "benchmarks.inprocess", "start", str(spec_file)], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=3600)
            if done.returncode != 0:
                raise RuntimeError(f"{phase} start failed: {done.stderr[-2000:]}")
            results[phase] = {**json.loads(done.stdout.strip().splitlines()[-1]),
                              "process_seconds": round(time.perf_counter() - started, 2)}
    return results


def _start(spec_file: str) -> None:
    spec = load_spec(Path(spec_file))
    configure_threads(spec.device.cpus)
    runtime = load_runtime(spec)
    print(json.dumps({"load_seconds": runtime.load_seconds, "backend": runtime.backend,
                      "cache": runtime.compiled.cache if runtime.compiled else None}))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "start":
        sys.exit("usage: python -m benchmarks.inprocess start SPEC.yaml")
    _start(sys.argv[2])
