"""``hybridserve-client bench``: a load generator in the spirit of Triton's perf_analyzer.

For each level (a concurrency N: N requests always in flight, closed loop; or a rate R:
requests started every 1/R s whatever the answers, open loop) it warms up, then measures for
``duration`` seconds: throughput, p50/p90/p99 latency, errors by code, and the generator's own
CPU share (process CPU time / wall time; 100% = one core busy) so that a saturated client is
visible. Open-loop latency counts from the scheduled start, so a late client cannot hide
queueing (no coordinated omission).

Engines (``--engine``): ``aiohttp`` (asyncio, the default for http(s):// when installed),
``threads`` (a thread pool sharing one httpx.Client, the fallback), ``httpx`` (httpx's
AsyncClient, for comparison) and ``grpc`` (grpc.aio, the only choice for grpc:// URLs).
Requests are built by the SDK itself. The aiohttp and threads engines read replies without
parsing them, as perf_analyzer does; the httpx and grpc engines go through the SDK's own
transports, typed results included.
"""

from __future__ import annotations

import asyncio
import io
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hybridserve_client._base import BaseClient, Operation
from hybridserve_client._http import GRACE_S, build_http_request, httpx_timeout
from hybridserve_client.exceptions import HybridServeError, error_from_http
from hybridserve_client.inputs import EncodedImage, encode_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
# A send returns None on success or the error code of the failure.
AsyncSend = Callable[[Operation], Awaitable[str | None]]
SyncSend = Callable[[Operation], str | None]


@dataclass
class Samples:
    """Completed requests of one level: (start, latency, error code or None)."""

    measure_from: float
    measure_until: float
    latencies: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    started: int = 0

    def add(self, start: float, latency: float, error: str | None) -> None:
        if not self.measure_from <= start < self.measure_until:
            return
        if error is None:
            self.latencies.append(latency)
        else:
            self.errors[error] += 1


@dataclass
class LevelResult:
    mode: str  # "concurrency" or "rate"
    level: float
    requests: int
    errors: int
    error_codes: dict[str, int]
    throughput: float  # successful requests per second
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    client_cpu: float  # process CPU seconds per wall second
    client_cpu_ms_per_request: float


def summarize(mode: str, level: float, samples: Samples, seconds: float, cpu_seconds: float) -> LevelResult:
    ms = np.asarray(samples.latencies, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(ms, (50, 90, 99)) if ms.size else (float("nan"),) * 3
    done = ms.size + sum(samples.errors.values())
    return LevelResult(
        mode=mode, level=level, requests=int(ms.size), errors=int(sum(samples.errors.values())),
        error_codes=dict(samples.errors), throughput=ms.size / seconds, mean_ms=float(ms.mean()) if ms.size else
        float("nan"), p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99), client_cpu=cpu_seconds / seconds,
        client_cpu_ms_per_request=1000.0 * cpu_seconds / max(1, done))


# ---------------------------------------------------------------- inputs


def load_images(folder: Path) -> list[EncodedImage]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return [encode_image(p) for p in files]


def generated_images(size: tuple[int, int], count: int = 4, seed: int = 0) -> list[EncodedImage]:
    """Smooth random pictures (gradients plus blobs and mild noise), PNG-encoded: not trivially compressible."""
    rng = np.random.default_rng(seed)
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    images = []
    for _ in range(count):
        picture = np.zeros((height, width, 3), np.float32)
        for channel in range(3):
            fx, fy, phase = rng.uniform(0.5, 4.0), rng.uniform(0.5, 4.0), rng.uniform(0, 6.3)
            picture[..., channel] = 128 + 100 * np.sin(fx * xx / width * 6.3 + fy * yy / height * 6.3 + phase)
        picture += rng.normal(0, 8, picture.shape)
        images.append(encode_image(np.clip(picture, 0, 255).astype(np.uint8)))
    return images


# ---------------------------------------------------------------- engines


def http_error_code(status: int, body: bytes, headers: Any) -> str | None:
    return None if status < 400 else error_from_http(status, body, headers).code


def aiohttp_engine(url: str) -> tuple[AsyncSend, Callable[[], Awaitable[None]]]:
    import aiohttp

    session = aiohttp.ClientSession(base_url=url, connector=aiohttp.TCPConnector(limit=0))

    async def send(operation: Operation) -> str | None:
        request = build_http_request(operation)
        data: Any = request.content
        if request.files:
            data = aiohttp.FormData()
            for name, (filename, content, content_type) in request.files.items():
                data.add_field(name, content, filename=filename, content_type=content_type)
        timeout = aiohttp.ClientTimeout(total=None if operation.timeout is None else operation.timeout + GRACE_S)
        try:
            async with session.request(request.method, request.path, params=request.params,
                                       headers=request.headers, data=data, timeout=timeout) as response:
                body = await response.read()
                return http_error_code(response.status, body, response.headers)
        except TimeoutError:
            return "deadline_exceeded"
        except aiohttp.ClientError:
            return "connection_failed"

    return send, session.close


def httpx_async_engine(url: str) -> tuple[AsyncSend, Callable[[], Awaitable[None]]]:
    from hybridserve_client._http import AsyncHTTPTransport

    return _transport_send(AsyncHTTPTransport(url))


def grpc_engine(url: str) -> tuple[AsyncSend, Callable[[], Awaitable[None]]]:
    from hybridserve_client._grpc_transport import AsyncGRPCTransport

    return _transport_send(AsyncGRPCTransport(url))


def _transport_send(transport: Any) -> tuple[AsyncSend, Callable[[], Awaitable[None]]]:
    async def send(operation: Operation) -> str | None:
        try:
            await transport.handle(operation)
        except HybridServeError as error:
            return error.code
        return None

    return send, transport.aclose


def threads_send(url: str, concurrency: int) -> tuple[SyncSend, Callable[[], None]]:
    import httpx

    client = httpx.Client(base_url=url, limits=httpx.Limits(max_connections=concurrency,
                                                            max_keepalive_connections=concurrency))

    def send(operation: Operation) -> str | None:
        request = build_http_request(operation)
        try:
            response = client.request(request.method, request.path, params=request.params, headers=request.headers,
                                      content=request.content, files=request.files,
                                      timeout=httpx_timeout(operation.timeout))
        except httpx.TimeoutException:
            return "deadline_exceeded"
        except httpx.TransportError:
            return "connection_failed"
        return http_error_code(response.status_code, response.content, response.headers)

    return send, client.close


ASYNC_ENGINES = {"aiohttp": aiohttp_engine, "httpx": httpx_async_engine, "grpc": grpc_engine}


def pick_engine(url: str, engine: str | None) -> str:
    if url.startswith("grpc"):
        return "grpc"
    if engine and engine != "auto":
        return engine
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return "threads"
    return "aiohttp"


# ---------------------------------------------------------------- load loops


class Progress:
    """A one-line progress bar on stderr for the level being run."""

    def __init__(self, label: str, total: float, samples: Samples, enabled: bool):
        self.label, self.total, self.samples, self.enabled = label, total, samples, enabled
        self.live = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()

    def draw(self, final: bool = False) -> None:
        if not (self.live or (final and self.enabled)):
            return
        elapsed = min(self.total, time.perf_counter() - self.start)
        filled = int(30 * elapsed / self.total)
        done, errors = len(self.samples.latencies), sum(self.samples.errors.values())
        sys.stderr.write(f"\r{self.label:>12} [{'#' * filled}{'.' * (30 - filled)}] {elapsed:5.1f}/{self.total:.0f}s "
                         f"{done:7d} ok {errors:5d} err")
        sys.stderr.write("\n" if final else "")
        sys.stderr.flush()


async def _async_level(send: AsyncSend, operations: list[Operation], mode: str, level: float,
                       samples: Samples, progress: Progress) -> None:
    stop_at, count = samples.measure_until, len(operations)

    async def one(operation: Operation, start: float) -> None:
        error = await send(operation)
        samples.add(start, time.perf_counter() - start, error)

    async def closed_loop(worker: int) -> None:
        index = worker
        while (start := time.perf_counter()) < stop_at:
            await one(operations[index % count], start)
            index += int(level)

    async def open_loop() -> None:
        interval, begin, sent, pending = 1.0 / level, time.perf_counter(), 0, set()
        while (due := begin + sent * interval) < stop_at:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            task = asyncio.ensure_future(one(operations[sent % count], due))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
        await asyncio.gather(*pending)

    async def redraw() -> None:
        while time.perf_counter() < stop_at:
            progress.draw()
            await asyncio.sleep(0.25)

    drawer = asyncio.ensure_future(redraw())
    if mode == "rate":
        await open_loop()
    else:
        await asyncio.gather(*(closed_loop(worker) for worker in range(int(level))))
    drawer.cancel()


def _threads_level(send: SyncSend, operations: list[Operation], level: int, samples: Samples,
                   progress: Progress) -> None:
    def worker(index: int) -> None:
        while (start := time.perf_counter()) < samples.measure_until:
            error = send(operations[index % len(operations)])
            samples.add(start, time.perf_counter() - start, error)
            index += level

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(level)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        progress.draw()
        time.sleep(0.25)


def cpu_meter(start_in: float, stop_in: float) -> dict[str, float]:
    """Process CPU time read at two moments from now (filled in by timer threads)."""
    marks: dict[str, float] = {}
    for key, delay in (("start", start_in), ("stop", stop_in)):
        timer = threading.Timer(delay, lambda key=key: marks.setdefault(key, time.process_time()))
        timer.daemon = True
        timer.start()
    return marks


@dataclass
class BenchConfig:
    url: str
    model: str
    verb: str
    images: list[EncodedImage]
    levels: list[float]
    mode: str = "concurrency"
    duration: float = 10.0
    warmup: float = 2.0
    engine: str = "auto"
    timeout: float = 30.0
    needs_reference: bool = False
    api_key: str | None = None
    token: str | None = None
    progress: bool = True  # a live bar on a terminal; one line per level otherwise


def run_bench(config: BenchConfig) -> list[LevelResult]:
    """Run every level and return one result per level."""
    engine = pick_engine(config.url, config.engine)
    if config.mode == "rate" and engine == "threads":
        raise SystemExit("--rate needs an asyncio engine (aiohttp, httpx or grpc); --engine threads is closed-loop only")
    sdk = BaseClient(config.url, api_key=config.api_key, token=config.token, timeout=config.timeout,
                     protocol="grpc" if engine == "grpc" else "http")
    operations = [sdk._inference(config.verb, config.model, image, image if config.needs_reference else None, {})
                  for image in config.images]
    results = []
    for level in config.levels:
        label = f"{'c' if config.mode == 'concurrency' else 'rate'}={level:g}"
        begin = time.perf_counter()
        samples = Samples(begin + config.warmup, begin + config.warmup + config.duration)
        progress = Progress(label, config.warmup + config.duration, samples, config.progress)
        cpu_marks = cpu_meter(config.warmup, config.warmup + config.duration)
        if engine == "threads":
            send, close = threads_send(config.url, int(level))
            _threads_level(send, operations, int(level), samples, progress)
            close()
        else:
            asyncio.run(_run_async(ASYNC_ENGINES[engine], config, operations, level, samples, progress))
        now = time.process_time()
        cpu_seconds = cpu_marks.get("stop", now) - cpu_marks.get("start", now)
        progress.draw(final=True)
        seconds = max(1e-9, min(time.perf_counter(), samples.measure_until) - samples.measure_from)
        results.append(summarize(config.mode, level, samples, seconds, cpu_seconds))
    return results


async def _run_async(factory: Callable[..., Any], config: BenchConfig, operations: list[Operation], level: float,
                     samples: Samples, progress: Progress) -> None:
    send, close = factory(config.url)
    try:
        await _async_level(send, operations, config.mode, level, samples, progress)
    finally:
        await close()


# ---------------------------------------------------------------- reports

COLUMNS = ("level", "throughput", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "requests", "errors", "client_cpu")


def table(results: list[LevelResult]) -> str:
    head = results[0].mode if results else "level"
    lines = [f"{head:>11} {'req/s':>9} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'errors':>7} {'client CPU':>11}"
             f" {'CPU ms/req':>11}"]
    for r in results:
        codes = ", ".join(f"{code} {n}" for code, n in sorted(r.error_codes.items()))
        lines.append(f"{r.level:>11g} {r.throughput:>9.1f} {r.p50_ms:>9.2f} {r.p90_ms:>9.2f} {r.p99_ms:>9.2f} "
                     f"{r.errors:>7d} {100 * r.client_cpu:>10.0f}% {r.client_cpu_ms_per_request:>11.2f}"
                     + (f"  ({codes})" if codes else ""))
    return "\n".join(lines)


def to_csv(results: list[LevelResult]) -> str:
    out = io.StringIO()
    out.write("mode," + ",".join(COLUMNS) + ",client_cpu_ms_per_request\n")
    for r in results:
        row = asdict(r)
        out.write(r.mode + "," + ",".join(f"{row[c]:g}" for c in COLUMNS) + f",{r.client_cpu_ms_per_request:g}\n")
    return out.getvalue()


def to_json(config: BenchConfig, results: list[LevelResult]) -> dict[str, Any]:
    return {"url": config.url, "model": config.model, "verb": config.verb, "engine": pick_engine(config.url, config.engine),
            "mode": config.mode, "duration_s": config.duration, "warmup_s": config.warmup,
            "images": len(config.images), "levels": [asdict(r) for r in results]}
