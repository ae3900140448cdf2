"""Benchmark results, kept per workload as JSON, and their Markdown (the generated part of BENCHMARKS.md).

Each run saves its workloads' results; BENCHMARKS.md is rendered from the latest saved result
of every workload, so ``--only craft-x4`` refreshes CRAFT and keeps the classifier's section.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.loadgen import LoadResult
from benchmarks.servers import FASTAPI, LITSERVE, PLAIN_RAY

BEGIN, END = "<!-- bench:begin (written by python -m benchmarks.run) -->", "<!-- bench:end -->"


@dataclass(frozen=True)
class Point:
    """One measured window of one server at one concurrency."""

    throughput: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    seconds: float
    client_cpu_share: float
    server_cpu_share: float | None

    @property
    def cpu_ms_per_request(self) -> float | None:
        """CPU-ms of every server process per answered request."""
        return None if self.server_cpu_share is None or not self.throughput else 1000 * self.server_cpu_share / self.throughput

    @classmethod
    def of(cls, run: LoadResult) -> Point:
        server = None if run.server_cpu_s is None else run.server_cpu_s / run.seconds
        return cls(run.throughput, run.p50_ms, run.p99_ms, run.errors, run.seconds, run.client_cpu_share, server)


@dataclass
class WorkloadResults:
    name: str
    compiled: str
    compute_bound: bool
    header: list[str] = field(default_factory=list)  # when, where and how it was measured
    limit: dict[str, dict[int, float]] = field(default_factory=dict)  # backend -> batch -> images/s
    round_limit: dict[str, list[float]] = field(default_factory=dict)  # backend -> images/s in each server round
    pipeline_ms: dict[str, float] = field(default_factory=dict)  # backend -> one request in-process
    loads: dict[str, str] = field(default_factory=dict)  # backend -> how it loaded
    compile_ms: dict[str, dict[int, float]] = field(default_factory=dict)
    starts: dict[str, dict] | None = None
    runs: dict[str, dict[int, list[Point]]] = field(default_factory=dict)  # system -> concurrency -> rounds
    ready_s: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    profiles: dict[str, str] = field(default_factory=dict)
    adaptive: dict[str, dict[int, dict]] = field(default_factory=dict)  # system -> concurrency -> live batching
    default_backend: str = "eager"  # the spec's own backend: what the default command serves

    @property
    def default(self) -> str:
        """The row of the default command (``hybridserve serve`` on Ray) on the spec as written."""
        return f"hybridserve Ray ({self.default_backend})"

    def best_limit(self, backend: str) -> tuple[int, float]:
        """(batch size, images/s) of the fastest in-process forward seen: limit rounds and compile-table rounds."""
        by_batch = dict(self.limit.get(backend, {}))
        for size, ms in self.compile_ms.get(backend, {}).items():
            if by_batch and size <= max(by_batch):
                by_batch[size] = max(by_batch.get(size, 0.0), 1000.0 * size / ms)
        return max(by_batch.items(), key=lambda kv: kv[1]) if by_batch else (0, 0.0)

    def best_sizes(self, backend: str, count: int = 3) -> list[int]:
        """The batch sizes of the ``count`` fastest limit measurements."""
        by_batch = self.limit.get(backend, {})
        return sorted(by_batch, key=by_batch.get, reverse=True)[:count]

    def rounds(self, system: str, concurrency: int, metric: str = "throughput") -> list[float | None]:
        """``metric`` of ``system`` in each round, in round order."""
        return [getattr(r, metric) for r in self.runs.get(system, {}).get(concurrency, [])]

    def limit_rounds(self, backend: str, count: int) -> list[float]:
        """The limit measured beside each of ``count`` rounds (the best-ever limit where a run has none)."""
        measured = self.round_limit.get(backend, [])
        return measured if len(measured) == count else [self.best_limit(backend)[1]] * count

    def versus_limit(self, system: str, concurrency: int, backend: str) -> float | None:
        """Median over rounds of the system's throughput / the limit measured in the same round."""
        served = self.rounds(system, concurrency)
        return paired(served, self.limit_rounds(backend, len(served)))

    def throughput(self, system: str, concurrency: int) -> float | None:
        runs = self.runs.get(system, {}).get(concurrency)
        return statistics.median(r.throughput for r in runs) if runs else None

    def p50(self, system: str, concurrency: int) -> float | None:
        runs = [r.p50_ms for r in self.runs.get(system, {}).get(concurrency, []) if r.p50_ms is not None]
        return statistics.median(runs) if runs else None

    def cpu_ms(self, system: str, concurrency: int) -> float | None:
        """Median server CPU-ms per answered request."""
        return _median([r.cpu_ms_per_request for r in self.runs.get(system, {}).get(concurrency, [])])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> WorkloadResults:
        data = json.loads(path.read_text())

        def by_int(mapping: dict) -> dict:
            return {int(k): v for k, v in mapping.items()}

        data["limit"] = {b: by_int(v) for b, v in data["limit"].items()}
        data["compile_ms"] = {b: by_int(v) for b, v in data["compile_ms"].items()}
        data["adaptive"] = {s: by_int(v) for s, v in data["adaptive"].items()}
        data["runs"] = {s: {int(c): [Point(**p) for p in points] for c, points in by_c.items()}
                        for s, by_c in data["runs"].items()}
        return cls(**data)


def paired(a: list[float | None], b: list[float | None], difference: bool = False) -> float | None:
    """Median over rounds of a/b (or a-b): values measured in the same round are compared with each
    other, so a machine that speeds up or slows down between rounds does not decide a comparison."""
    values = [x - y if difference else x / y for x, y in zip(a, b)
              if x is not None and y is not None and (difference or y)]
    return statistics.median(values) if values else None


def _num(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _median(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _rate(value: float) -> str:
    return f"{value:,.2f}" if value < 10 else f"{value:,.1f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _system_backend(system: str, compiled: str) -> str:
    return compiled if f"({compiled}" in system else "eager"


def render_workload(w: WorkloadResults) -> list[str]:
    lines = [f"### {w.name}", "", *w.header, ""]
    lim_b, lim = w.best_limit(w.compiled)
    eager_b, eager_lim = w.best_limit("eager")
    lines += [f"In-process limit: **{_rate(lim)} images/s** ({w.compiled}, batch {lim_b}); "
              f"eager {_rate(eager_lim)} images/s (batch {eager_b}): the fastest batched forward seen in the limit "
              f"rounds and the compile table's rounds. One request in-process (JSON, decode, batch-1 "
              f"forward, postprocess): " + ", ".join(f"{b} {ms:.2f} ms" for b, ms in w.pipeline_ms.items()) + ".",
              "", "Limit rounds, best per batch size (images/s): " + "; ".join(
                  f"{b}: " + ", ".join(f"{n}→{_rate(v)}" for n, v in by.items()) for b, by in w.limit.items()),
              *(["", "The limit measured again at the start of each server round, every server paused (images/s, "
                 "best of the sizes " + "; ".join(f"{b} {w.best_sizes(b)}" for b in w.round_limit) + "): " +
                 "; ".join(f"{b}: " + ", ".join(_rate(v) for v in rates) for b, rates in w.round_limit.items()) +
                 ". \"vs limit\" and the targets divide each round's throughput by the limit of that round."]
                if w.round_limit else []),
              "", "Model loads in the benchmark process: " + "; ".join(f"{b}: {how}" for b, how in w.loads.items()), ""]
    lines += ["Medians over the rounds (throughput range in brackets); errors summed.", "",
              "| server | concurrency | images/s | p50 ms | p99 ms | errors | vs limit | overhead at c=1 (ms) "
              "| load-generator CPU | server CPU | server CPU-ms/request |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for system, by_c in w.runs.items():
        backend = _system_backend(system, w.compiled)
        for concurrency, runs in sorted(by_c.items()):
            mid = Point(*(_median([getattr(r, f.name) for r in runs]) for f in dataclasses.fields(Point)))
            overhead = (mid.p50_ms - w.pipeline_ms[backend]) if concurrency == 1 and mid.p50_ms else None
            server_cpu = None if mid.server_cpu_share is None else 100 * mid.server_cpu_share
            spread = "" if len(runs) < 2 else f" ({_rate(min(r.throughput for r in runs))}–{_rate(max(r.throughput for r in runs))})"
            lines.append(f"| {system} | {concurrency} | {_rate(mid.throughput)}{spread} | {_num(mid.p50_ms)} | "
                         f"{_num(mid.p99_ms)} | {sum(r.errors for r in runs)} | "
                         f"{_num(w.versus_limit(system, concurrency, backend), 2)}x | {_num(overhead)} | "
                         f"{100 * mid.client_cpu_share:.0f}% | {_num(server_cpu, 0)}% | "
                         f"{_num(w.cpu_ms(system, concurrency), 2)} |")
    for system, by_c in w.adaptive.items():
        lines += ["", f"{system}: live choice after each concurrency: " + "; ".join(
            f"c={c}: batch {info['max_batch_size']}, wait {info['max_wait_ms']:.2f} ms" for c, info in sorted(by_c.items()))]
    if w.failures:
        lines += ["", "Not measured: " + "; ".join(f"{s}: {why}" for s, why in w.failures.items())]
    if w.ready_s:
        lines += ["", "Servers ready after their start (the Ray ones one after another, then the rest together; each "
                  "measured with the others paused): " +
                  ", ".join(f"{s} {t:.0f}s" for s, t in w.ready_s.items())]
    if w.compile_ms:
        sizes = sorted(next(iter(w.compile_ms.values())))
        eager = w.compile_ms.get("eager", {})
        lines += ["", "Compile speed-up (ms per batch, median of interleaved rounds; speed-up vs eager):", "",
                  "| backend | " + " | ".join(f"batch {n}" for n in sizes) + " |",
                  "|---|" + "---:|" * len(sizes)]
        for backend, by_size in w.compile_ms.items():
            cells = [f"{by_size[n]:.2f} ms ({_num(_ratio(eager.get(n), by_size[n]), 2)}x)" for n in sizes]
            lines.append(f"| {backend} | " + " | ".join(cells) + " |")
    if w.starts:
        cold, warm = w.starts["cold"], w.starts["warm"]
        lines += ["", f"Start of a fresh process with the {w.compiled} backend: cold (empty caches) ready in "
                  f"{cold['load_seconds']:.1f} s (process {cold['process_seconds']:.1f} s, cache {cold['cache']}); "
                  f"warm {warm['load_seconds']:.2f} s (process {warm['process_seconds']:.1f} s, cache {warm['cache']}): "
                  f"{_num(_ratio(warm['load_seconds'], cold['load_seconds']), 3)} of the cold start."]
    for system, text in w.profiles.items():
        lines += ["", f"py-spy profile of {system} at concurrency 32 (share of samples):", "", "```", text, "```"]
    return lines + [""]


def targets(results: list[WorkloadResults]) -> list[str]:
    """Issue 13's targets, each with its measured value: the median over rounds of the comparison
    within each round (a ratio or a difference of two values measured in the same round; a limit
    measured in that round, beside its servers). "Default" is the
    command the README gives, ``hybridserve serve`` on Ray, serving the spec as written (its own
    compile backend: the built-in classifier's spec asks for aot, the timm workload's for none)."""
    out = ["| workload | target | measured | met |", "|---|---|---|---|"]

    def row(w: WorkloadResults, text: str, value: float | None, goal: float, higher: bool = True,
            unit: str = "x", detail: str = "") -> None:
        met = "—" if value is None else ("yes" if (value >= goal if higher else value <= goal) else "NO")
        measured = "—" if value is None else f"{_num(value, 2)}{unit}{detail}"
        out.append(f"| {w.name} | {text} | {measured} | {met} |")

    for w in results:
        c, default = w.compiled, w.default

        def versus(system: str, concurrency: int = 32, metric: str = "throughput", difference: bool = False):
            return paired(w.rounds(default, concurrency, metric), w.rounds(system, concurrency, metric), difference)

        row(w, "default `hybridserve serve`, c=32: / plain Ray Serve app >= 1.0", versus(PLAIN_RAY), 1.0)
        if w.compute_bound:
            row(w, f"default, c=32: / in-process limit ({w.default_backend}) >= 0.95",
                w.versus_limit(default, 32, w.default_backend), 0.95)
        else:
            noray = f"hybridserve no-ray ({c})"
            row(w, "default, c=32: / LitServe batched >= 1.0", versus(LITSERVE), 1.0)
            row(w, f"`--no-ray` ({c}), c=32: / LitServe batched >= 1.2",
                paired(w.rounds(noray, 32), w.rounds(LITSERVE, 32)), 1.2)
            row(w, f"`--no-ray` ({c}), c=32: / in-process {c} limit >= 0.5", w.versus_limit(noray, 32, c), 0.5)
            row(w, "default, c=32: server CPU-ms/request / LitServe's <= 1.0",
                versus(LITSERVE, metric="cpu_ms_per_request"), 1.0, higher=False,
                detail=f" ({_num(w.cpu_ms(default, 32), 2)} vs {_num(w.cpu_ms(LITSERVE, 32), 2)} ms)")
        row(w, "default, c=1: p50 minus plain FastAPI's p50 <= 3 ms",
            versus(FASTAPI, 1, "p50_ms", difference=True), 3.0, higher=False, unit=" ms")
    return out


def other_checks(results: list[WorkloadResults]) -> list[str]:
    """Earlier issues' checks that the same run measures: the batching gain and the warm start."""
    out = ["| workload | check | measured |", "|---|---|---|"]
    for w in results:
        c = w.compiled
        if w.runs.get(f"hybridserve no-ray ({c}), batch 1"):
            gain = paired(w.rounds(f"hybridserve no-ray ({c})", 32), w.rounds(f"hybridserve no-ray ({c}), batch 1", 32))
            out.append(f"| {w.name} | no-ray, {c}, c=32: dynamic batching / batch size 1 (goal >= 2) | {_num(gain, 2)}x |")
            lit = paired(w.rounds(LITSERVE, 32), w.rounds("LitServe batch 1 (eager)", 32))
            out.append(f"| {w.name} | LitServe, c=32: its batching / batch size 1 | {_num(lit, 2)}x |")
        eager_ray = "hybridserve Ray (eager)"
        if w.default_backend != "eager" and w.runs.get(eager_ray) and not w.compute_bound:
            eager = [paired(w.rounds(eager_ray, 32, metric), w.rounds(LITSERVE, 32, metric))
                     for metric in ("throughput", "cpu_ms_per_request")]
            out.append(f"| {w.name} | the default command on the spec served eager, c=32: / LitServe batched "
                       f"(both eager); server CPU-ms/request / LitServe's | {_num(eager[0], 2)}x; {_num(eager[1], 2)}x |")
        if w.starts:
            warm = _ratio(w.starts["warm"]["load_seconds"], w.starts["cold"]["load_seconds"])
            out.append(f"| {w.name} | fresh process, {c}: warm-cache start / cold start (goal <= 0.33) | {_num(warm, 2)} |")
    return out if len(out) > 2 else []


def render(results: list[WorkloadResults]) -> str:
    lines = [BEGIN, "", "Each workload's section says when, on what and with which command it was measured.", "",
             "## Targets (issue 13)", "", *targets(results), ""]
    checks = other_checks(results)
    if checks:
        lines += ["## Other checks", "", *checks, ""]
    lines += ["## Results", ""]
    for w in results:
        lines += render_workload(w)
    return "\n".join(lines + [END])


def write(path: Path, generated: str) -> None:
    """Replace the generated part of ``path`` (between the markers), keeping the hand-written rest."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
        before, rest = text.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        text = before + generated + after
    else:
        text = text.rstrip() + "\n\n" + generated + "\n"
    path.write_text(text)
