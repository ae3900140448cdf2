"""Run the side-by-side benchmark and write BENCHMARKS.md: ``python -m benchmarks.run [--quick] [--only NAME]``.

Per workload: in-process limit and compile table first (no server running), then cold/warm
start in fresh processes, then every server started together and measured in interleaved
rounds (each round measures the limit again with every server paused, then visits every server
at every concurrency, the order rotating), each with the other servers paused (SIGSTOP to their
whole session: an idle Ray cluster alone takes about 13% of a core here), then stopped. The load generator (aiohttp, this process) and the servers share the machine's
CPUs; every server and the in-process measurements run the spec's ``device.cpus`` torch threads.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from benchmarks import inprocess, profile, report
from benchmarks.loadgen import Target, busiest_now, closed_loop
from benchmarks.report import Point, WorkloadResults
from benchmarks.servers import ServerProcess, build_servers
from benchmarks.workloads import ROOT, Workload, workloads, write_repository
from hybridserve.models.weights import cache_dir
from hybridserve.server.engine.runtime import ModelRuntime, configure_threads

PEERS = ["plain-ray", "fastapi", "litserve", "litserve-nobatch", "bentoml"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def machine() -> list[str]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    model = fields.get("Model name", "?").strip()
    return [f"Run on {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}: {model}, {os.cpu_count()} CPUs "
            f"({fields.get('Thread(s) per core', '?').strip()} thread(s) per core), "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, Python "
            f"{platform.python_version()}, torch {torch.__version__}. Load average at the start: "
            f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}.",
            "", "CPU use over 2 s at the start (other work on the machine; 100% = one core):", "",
            *[f"    {line}" for line in busiest_now()]]


def measure_inprocess(w: Workload, results: WorkloadResults, args: argparse.Namespace,
                      folder: Path) -> dict[str, ModelRuntime]:
    """The limits, the compile table and the starts; returns the loaded runtimes for the rounds' limits."""
    runtimes = {}
    seconds = 0.5 if args.quick else 2.0
    for backend in ("eager", w.compiled_backend):
        started = time.perf_counter()
        runtime = inprocess.load_runtime(w.spec_for(backend))
        results.loads[backend] = (f"{runtime.backend}, {time.perf_counter() - started:.1f} s"
                                  + (f", compile cache {runtime.compiled.cache}" if runtime.compiled.cache else ""))
        results.limit[backend] = inprocess.limit(runtime, w, seconds)
        results.pipeline_ms[backend] = 1000.0 * inprocess.pipeline_seconds(runtime, w, seconds)
        log(f"{w.name} {backend}: limit {results.best_limit(backend)}, one request {results.pipeline_ms[backend]:.2f} ms")
        runtimes[backend] = runtime
    backends = ["eager", "aot"] if args.quick else ["eager", "inductor", "aot"]
    results.compile_ms = inprocess.compile_table(w, backends, 1 if args.quick else 3, seconds / 2)
    log(f"{w.name} compile table: {results.compile_ms}")
    gc.collect()
    if args.cold_start and (w.name == "classifier" or args.cold_start_all):
        results.starts = inprocess.cold_and_warm_start(w, w.compiled_backend, folder)
        log(f"{w.name} starts: {results.starts}")
    return runtimes


async def measure_servers(w: Workload, results: WorkloadResults, args: argparse.Namespace, folder: Path,
                          runtimes: dict[str, ModelRuntime]) -> None:
    compiled = w.compiled_backend
    adaptive = [w.spec_for(compiled, "slo")] if w.latency_slo_ms else []
    repositories = {
        "ray": write_repository(folder / "ray-repo", [w.spec_for("eager"), w.spec_for(compiled), *adaptive]),
        "noray": write_repository(folder / "noray-repo", [w.spec_for("eager"), w.spec_for(compiled), *adaptive,
                                                          *([w.spec_for(compiled, "nobatch")] if w.batching_gain else [])]),
    }
    eager_spec = next(write_repository(folder / "eager-repo", [w.spec_for("eager")]).glob("*.yaml"))
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    servers, systems = build_servers(w, repositories, eager_spec, logs, [p for p in PEERS if p not in args.skip])
    if "bentoml" not in servers and "bentoml" not in args.skip:
        results.failures["BentoML"] = "bentoml is not installed in .venv/bench-tools/bentoml (see docs/performance.md)"
    # Ray clusters start one after another (two starting at once on 2 cores can time out), then the rest together.
    order = [name for name in servers if servers[name].ray] + [name for name in servers if not servers[name].ray]
    try:
        for name in order:
            servers[name].start()
            if servers[name].ray:
                servers[name].wait_ready(args.ready_timeout)
        for name in order:
            server = servers[name]
            if server.ready_s is not None or server.wait_ready(args.ready_timeout):
                results.ready_s[name] = server.ready_s
            else:
                results.failures[name] = "did not become ready: " + server.tail(3).replace("\n", " | ")[-400:]
        log(f"{w.name} servers ready: {results.ready_s}; failed: {list(results.failures)}")
        live = []
        for system in systems:
            problem = probe(system.target) if system.server in results.ready_s else None
            if problem is None and system.server in results.ready_s:
                live.append(system)
            elif problem is not None:
                results.failures[system.label] = problem
        seconds = w.seconds_per_point / (4 if args.quick else 1)
        for round_index in range(args.rounds or (1 if args.quick else w.rounds)):
            for server in servers.values():  # the limit again, alone on the machine, beside this round's servers
                server.pause()
            measured = None
            for backend, runtime in runtimes.items():
                results.round_limit.setdefault(backend, []).append(
                    inprocess.round_limit(runtime, w, results.best_sizes(backend), 0.5 if args.quick else 2.0))
            log(f"{w.name} round {round_index + 1} limits: "
                + ", ".join(f"{b} {rates[-1]:.1f}/s" for b, rates in results.round_limit.items()))
            shift = round_index % max(1, len(live))
            for system in live[shift:] + live[:shift]:
                if system.server != measured:  # the others paused: one server on the machine, as for the limit
                    measured = system.server
                    await alone(servers, measured, system.target)
                for concurrency in system.concurrencies or args.concurrency:
                    run = await closed_loop(system.target, concurrency, seconds,
                                            servers[system.server].process.pid)
                    results.runs.setdefault(system.label, {}).setdefault(concurrency, []).append(Point.of(run))
                    if "adaptive" in system.label:
                        results.adaptive.setdefault(system.label, {})[concurrency] = batching_info(system.target.url)
                    log(f"{w.name} round {round_index + 1} {system.label} c={concurrency}: "
                        f"{run.throughput:.1f}/s p50 {run.p50_ms} p99 {run.p99_ms} errors {run.errors}")
        for label in args.profile:
            system = next((s for s in live if s.label == label), None)
            if system is not None:
                await alone(servers, system.server, system.target)
                results.profiles[label] = await profile_system(system, servers[system.server].process.pid, seconds,
                                                               folder / f"profile-{len(results.profiles)}.txt")
    finally:
        for server in servers.values():
            server.stop()


async def alone(servers: dict[str, ServerProcess], name: str, target: Target) -> None:
    """Pause every server but ``name`` and let it settle (a short load first: timers and caches that
    ran late while it was paused catch up outside the measurement)."""
    for other, server in servers.items():
        if other != name:
            server.pause()
    servers[name].resume()
    await closed_loop(target, 4, 2.0)


def probe(target: Target) -> str | None:
    """None if one request gets a 200 answer, else what went wrong."""
    request = urllib.request.Request(target.url, data=target.body, headers=target.headers)
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}: {exc.read()[:300]!r}"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def batching_info(infer_url: str) -> dict:
    """The live batching choice a hybridserve model reports (``GET /v1/models/{name}``)."""
    with urllib.request.urlopen(infer_url.rsplit("/", 1)[0], timeout=10) as response:
        return json.loads(response.read())["batching"]


async def profile_system(system, pid: int, seconds: float, output: Path) -> str:
    recorder = profile.start(pid, seconds + 2, output)
    if recorder is None:
        return "(py-spy is not installed)"
    await closed_loop(system.target, 32, seconds + 4, pid)
    recorder.wait(timeout=120)
    return profile.summarise(output, seconds + 2) if output.is_file() else "(py-spy wrote no samples)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short windows, one round, eager/aot compile table only")
    parser.add_argument("--only", nargs="*", help="workloads to run: classifier, efficientformerv2-s0, craft-x4")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: classifier and EfficientFormer 2, CRAFT 1; quick 1)")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--skip", nargs="*", default=[], choices=PEERS, help="peer servers to leave out")
    parser.add_argument("--no-servers", action="store_true", help="in-process measurements only")
    parser.add_argument("--no-cold-start", dest="cold_start", action="store_false")
    parser.add_argument("--cold-start-all", action="store_true", help="also cold-start CRAFT (minutes of compiling)")
    parser.add_argument("--profile", nargs="*", default=[], help="system labels to profile with py-spy at c=32")
    parser.add_argument("--ready-timeout", type=float, default=1800.0)
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--results", type=Path, default=cache_dir() / "bench",
                        help="where each workload's latest results are kept (BENCHMARKS.md is rendered from them)")
    args = parser.parse_args(argv)
    if args.quick:
        args.cold_start = False
    chosen = workloads(args.only)
    if not chosen:
        sys.exit(f"no workload matches {args.only}")
    folder = Path(tempfile.mkdtemp(prefix="hybridserve-bench-"))
    log(f"working folder {folder}")
    command = " ".join(sys.argv[1:] if argv is None else argv)
    for w in chosen:
        rounds = args.rounds or (1 if args.quick else w.rounds)
        batching = w.spec_for("eager").batching
        configure_threads(w.threads)
        header = machine() + ["", f"Command: `python -m benchmarks.run {command}`; {rounds} round(s) of "
                                  f"{w.seconds_per_point / (4 if args.quick else 1):.0f} s windows. Every server "
                                  f"batches with max_batch_size {batching.max_batch_size}, max_wait_ms "
                                  f"{batching.max_wait_ms:g} (LitServe batch_timeout, BentoML max_batch_size, "
                                  f"Ray Serve's @serve.batch) and runs {w.threads} torch thread(s), the spec's "
                                  f"device.cpus, as does the in-process limit. hybridserve pins each model's batch "
                                  f"thread to cores of its own, and the limit's forward likewise; the other servers "
                                  f"run as written. \"hybridserve Ray\" is the default `hybridserve serve`."]
        result = WorkloadResults(w.name, w.compiled_backend, w.compute_bound, header,
                                 default_backend=w.default_backend)
        runtimes = measure_inprocess(w, result, args, folder)
        if not args.no_servers:
            asyncio.run(measure_servers(w, result, args, folder / w.name, runtimes))
        del runtimes
        gc.collect()
        result.header.append(f"Load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}.")
        result.save(args.results / f"{w.name}.json")
    saved = [args.results / f"{w.name}.json" for w in workloads()]
    report.write(args.output, report.render([WorkloadResults.load(path) for path in saved if path.is_file()]))
    log(f"wrote {args.output} from {', '.join(str(p) for p in saved if p.is_file())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
