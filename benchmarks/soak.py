"""``make soak``: ``hybridserve serve`` on Ray under mixed traffic for a long while (default 30 minutes).

Every built-in model (every task), over HTTP and gRPC through the client SDK's own transports,
round-robin, open loop (requests start on schedule whatever the answers) at ``--load`` (70%) of
the capacity a closed-loop probe of the same mix measures first; one request in
``--malformed-every`` (100) carries bytes that are no image, alternating transports, and must get
a 4xx. Reports p50/p99 per minute, answers by transport and status (or error code), requests that
hung past their deadline, and the RSS of every server process at the start and end of the soak,
against a stated bound. The server is stopped with SIGTERM at the end (a graceful drain) and its
exit status reported. ``--write BENCHMARKS.md`` replaces that file's "Soak" section.

    python -m benchmarks.soak --minutes 30 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

from hybridserve.server.repository import builtin_repository, load_repository
from hybridserve_client._base import BaseClient
from hybridserve_client._grpc_transport import AsyncGRPCTransport
from hybridserve_client._http import AsyncHTTPTransport
from hybridserve_client.bench import generated_images
from hybridserve_client.exceptions import HybridServeError
from hybridserve_client.inputs import EncodedImage
from benchmarks.servers import ROOT, ServerProcess, free_port

TIMEOUT_S = 30.0
HUNG_S = TIMEOUT_S + 5.0  # an answer later than this is a request that hung past its deadline
# Bound on memory growth, per server process, once warm (allocator caches and batch buffers at their
# sizes after WARM_MINUTES): RSS at the end <= RSS when warm * (1 + 10%) + 32 MiB.
WARM_MINUTES = 5.0
GROWTH_FACTOR, GROWTH_MB = 0.10, 32.0
SECTION = "## Soak"
# gRPC errors carry a code, not an HTTP status: these are the client's (4xx) ones.
CLIENT_ERRORS = {"invalid_input", "wrong_task", "unprocessable_image", "unsupported_media_type", "payload_too_large"}


def rss_by_process(root_pid: int) -> dict[int, tuple[str, float]]:
    """(name, RSS in MiB) of the server and every process under it, by pid."""
    parents: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])].append(int(entry.name))
            except OSError:
                continue
    found, todo = {}, [root_pid]
    while todo:
        pid = todo.pop()
        todo.extend(parents.get(pid, []))
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        rss = next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0.0)
        name = command[0].decode(errors="replace")
        label = name.split(".")[0] if name.startswith("ray::") else Path(name).name
        if label.startswith("python"):
            label = " ".join(part.decode(errors="replace") for part in command[1:4])
        found[pid] = (label[:60], rss)
    return found


class Soak:
    def __init__(self, url: str, grpc_target: str, specs):
        self.sdk = BaseClient(url, timeout=TIMEOUT_S)
        self.transports = {"http": AsyncHTTPTransport(url, max_in_flight=256), "grpc": AsyncGRPCTransport(grpc_target)}
        small, large = generated_images((96, 96), count=4), generated_images((176, 176), count=4)
        self.operations = []
        for spec in specs:
            reference = spec.task == "iqa" and spec.iqa is not None and spec.iqa.kind == "full-reference"
            # Full-reference metrics are cheap; MS-SSIM's five scales need 176 pixels a side.
            for index, image in enumerate(large if reference else small):
                operation = self.sdk._inference(spec.verb, spec.name, image, image if reference else None, {})
                self.operations.append((spec.name, operation, "http" if index % 2 == 0 else "grpc"))
        first = specs[0]
        self.malformed = self.sdk._inference(first.verb, first.name, EncodedImage(b"not an image", "image/png"),
                                             None, {})
        self.records: list[tuple[float, float, str, str, bool]] = []  # start, latency, transport, outcome, malformed

    async def one(self, index: int, start: float, malformed_every: int) -> None:
        malformed = malformed_every > 0 and index % malformed_every == malformed_every - 1
        if malformed:
            transport, operation = ("http", "grpc")[(index // malformed_every) % 2], self.malformed
        else:
            _, operation, transport = self.operations[index % len(self.operations)]
        try:
            await self.transports[transport].handle(operation)
            outcome = "200"
        except HybridServeError as error:
            outcome = str(error.status) if error.status else error.code
        self.records.append((start, time.perf_counter() - start, transport, outcome, malformed))

    async def closed_loop(self, concurrency: int, seconds: float) -> float:
        """Successful answers per second of the mix, ``concurrency`` always in flight."""
        stop_at = time.perf_counter() + seconds

        async def worker(offset: int) -> None:
            index = offset
            while time.perf_counter() < stop_at:
                await self.one(index, time.perf_counter(), 0)
                index += concurrency

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        ok = sum(1 for record in self.records if record[3] == "200")
        self.records.clear()
        return ok / seconds

    async def open_loop(self, rate: float, seconds: float, malformed_every: int) -> int:
        """Requests on schedule for ``seconds``; a client that falls behind skips slots, never bursts."""
        begin = time.perf_counter()
        end, sent, pending = begin + seconds, 0, set()
        while (due := begin + sent / rate) < end:
            now = time.perf_counter()
            if due < now - 0.5:  # more than half a second behind: the schedule moves on
                begin, due = now - sent / rate, now
            await asyncio.sleep(max(0.0, due - now))
            task = asyncio.ensure_future(self.one(sent, due, malformed_every))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
        await asyncio.gather(*pending)
        return sent

    async def close(self) -> None:
        for transport in self.transports.values():
            await transport.aclose()


def per_minute(records, begin: float) -> list[dict]:
    minutes: dict[int, list] = defaultdict(list)
    for record in records:
        minutes[int((record[0] - begin) // 60)].append(record)
    rows = []
    for minute in sorted(minutes):
        ok = sorted(r[1] * 1000 for r in minutes[minute] if r[3] == "200")
        errors = Counter(r[3] for r in minutes[minute] if r[3] != "200" and not r[4])
        rows.append({"minute": minute + 1, "requests": len(minutes[minute]), "ok": len(ok),
                     "p50_ms": round(statistics.median(ok), 1) if ok else None,
                     "p99_ms": round(ok[min(len(ok) - 1, int(len(ok) * 0.99))], 1) if ok else None,
                     "errors": dict(errors)})
    return rows


def report(result: dict) -> str:
    rss = result["rss_mb"]  # pid -> [name, start, warm, end]
    total = [sum(row[i] or 0 for row in rss.values()) for i in (1, 2, 3)]
    lines = [SECTION, "",
             f"`make soak` ({result['when']}, {result['machine']}): `hybridserve serve` on Ray, HAProxy ingress, "
             f"built-in repository ({result['models']} models, every task), HTTP and gRPC through the SDK's "
             f"transports, open loop at {result['load']:.0%} of the {result['capacity_rps']:.1f} req/s a closed-loop "
             f"probe measured ({result['rate_rps']:.1f} req/s) for {result['minutes']:g} minutes; one request in "
             f"{result['malformed_every']} malformed; {result['achieved_rps']:.1f} req/s achieved, the load generator "
             f"using {result['client_cpu']:.0%} of a core. {result['note']}", "",
             f"- requests: {result['requests']} sent, {result['answered']} answered, {result['hung']} hung past "
             f"{HUNG_S:g}s; answers by transport and status: `{json.dumps(result['by_status'])}`",
             f"- malformed requests: `{json.dumps(result['malformed'])}` (each must be a 4xx, or its gRPC code)",
             f"- server processes: {len(rss)}; RSS total {total[0]:.0f} MiB at the start, {total[1]:.0f} MiB after "
             f"{result['warm_minutes']:g} min (warm), {total[2]:.0f} MiB at the end; bound per process: end <= warm x "
             f"{1 + GROWTH_FACTOR:g} + {GROWTH_MB:g} MiB: "
             f"{'held' if not result['over_bound'] else 'EXCEEDED by ' + ', '.join(result['over_bound'])}",
             f"- SIGTERM at the end: drained and exited {result['exit_status']} in {result['stop_s']:.1f}s", "",
             "| minute | requests | ok | p50 ms | p99 ms | errors |", "|---:|---:|---:|---:|---:|---|"]
    for row in result["per_minute"]:
        lines.append(f"| {row['minute']} | {row['requests']} | {row['ok']} | {row['p50_ms']} | {row['p99_ms']} | "
                     f"{json.dumps(row['errors']) if row['errors'] else ''} |")
    lines += ["", "| pid | process | RSS start MiB | warm MiB | end MiB |", "|---:|---|---:|---:|---:|"]
    for pid, (name, *values) in sorted(rss.items(), key=lambda item: item[1][0]):
        cells = " | ".join("" if value is None else f"{value:.0f}" for value in values)
        lines.append(f"| {pid} | `{name}` | {cells} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace (or append) the file's "## Soak" section, up to the next "## " heading."""
    old = path.read_text()
    if SECTION in old:
        head, rest = old.split(SECTION, 1)
        tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
        path.write_text(head + text + tail)
    else:
        path.write_text(old.rstrip("\n") + "\n\n" + text)


async def soak(args: argparse.Namespace, server: ServerProcess, url: str, grpc_target: str, specs) -> dict:
    runner = Soak(url, grpc_target, specs)
    capacity = await runner.closed_loop(args.probe_concurrency, args.probe_seconds)
    rate = max(1.0, capacity * args.load)
    print(f"capacity {capacity:.1f} req/s; soaking at {rate:.1f} req/s for {args.minutes:g} min", flush=True)
    rss_start = rss_by_process(server.process.pid)
    begin, cpu = time.perf_counter(), time.process_time()
    warm_after = min(WARM_MINUTES, args.minutes / 2) * 60
    loop = asyncio.ensure_future(runner.open_loop(rate, args.minutes * 60, args.malformed_every))
    await asyncio.sleep(warm_after)
    rss_warm = rss_by_process(server.process.pid)
    sent = await loop
    rss_end = rss_by_process(server.process.pid)
    seconds, cpu = time.perf_counter() - begin, time.process_time() - cpu
    await runner.close()
    records = runner.records
    over = [f"{pid} {name}" for pid, (name, warm) in rss_warm.items()
            if pid in rss_end and rss_end[pid][1] > warm * (1 + GROWTH_FACTOR) + GROWTH_MB]
    by_status = Counter(f"{r[2]} {r[3]}" for r in records if not r[4])
    return {"capacity_rps": capacity, "rate_rps": rate, "requests": sent, "answered": len(records),
            "achieved_rps": sent / seconds, "client_cpu": cpu / seconds,
            "hung": sum(1 for r in records if r[1] > HUNG_S), "by_status": dict(sorted(by_status.items())),
            "malformed": dict(Counter(f"{r[2]} {r[3]}" for r in records if r[4])),
            "per_minute": per_minute(records, begin), "warm_minutes": warm_after / 60,
            "rss_mb": {str(pid): [name, rss_start.get(pid, (name, None))[1], warm, rss_end.get(pid, (name, None))[1]]
                       for pid, (name, warm) in {**rss_start, **rss_warm, **rss_end}.items()},
            "over_bound": over}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--load", type=float, default=0.7, help="fraction of the measured capacity (default 0.7)")
    parser.add_argument("--malformed-every", type=int, default=100)
    parser.add_argument("--probe-seconds", type=float, default=30.0)
    parser.add_argument("--probe-concurrency", type=int, default=8)
    parser.add_argument("--note", default="Other work shared the machine's CPUs during the run.")
    parser.add_argument("--write", type=Path, help="replace this Markdown file's Soak section with the report")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    args = parser.parse_args(argv)
    specs = load_repository(builtin_repository())
    port, grpc_port = free_port(), free_port()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    server = ServerProcess("hybridserve", [sys.executable, "-m", "hybridserve.server.cli.main", "serve", "--host",
                                           "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port),
                                           "--metrics-export-port", str(free_port())],
                           f"http://127.0.0.1:{port}/readyz", args.json.with_suffix(".log"), ray=True,
                           env={"RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
                                "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())})
    server.start()
    if not server.wait_ready(600):
        print(f"the server did not get ready:\n{server.tail()}", file=sys.stderr)
        server.stop()
        return 1
    try:
        result = asyncio.run(soak(args, server, f"http://127.0.0.1:{port}", f"grpc://127.0.0.1:{grpc_port}", specs))
    finally:
        stopping = time.monotonic()
        server.process.terminate()
        try:
            exit_status = server.process.wait(timeout=60)
        except Exception:
            exit_status = "none (killed after 60 s)"
        stop_s = time.monotonic() - stopping
        server.stop()
    result.update(when=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), models=len(specs),
                  machine=f"{os.cpu_count()} CPUs, {platform.machine()}", load=args.load, minutes=args.minutes,
                  malformed_every=args.malformed_every, note=args.note, exit_status=exit_status, stop_s=stop_s)
    args.json.write_text(json.dumps(result, indent=1))
    text = report(result)
    print(text)
    if args.write:
        write_section(args.write, text)
    bad = result["hung"] or result["over_bound"] or exit_status != 0 or result["answered"] != result["requests"] or any(
        not (k.split()[1].startswith("4") or k.split()[1] in CLIENT_ERRORS) for k in result["malformed"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
