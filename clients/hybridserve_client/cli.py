"""The ``hybridserve-client`` command: one-off calls that print readable results, and ``bench``.

    hybridserve-client classify http://localhost:8000 classifier digit.png
    hybridserve-client detect   http://localhost:8000 detector scene.jpg -o boxes.png
    hybridserve-client restore  http://localhost:8000 super-resolution-x2 small.png -o big.png
    hybridserve-client assess   http://localhost:8000 psnr distorted.png --reference original.png
    hybridserve-client segment  http://localhost:8000 segmenter scene.png -o mask.png
    hybridserve-client models   http://localhost:8000
    hybridserve-client bench    http://localhost:8000 classifier --concurrency 1,8,32 --duration 10

An API key or bearer token comes from --api-key/--token or HYBRIDSERVE_API_KEY/HYBRIDSERVE_TOKEN.
Exit status: 0 on success, 1 when the server answered with an error, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from hybridserve_client.client import Client
from hybridserve_client.exceptions import HybridServeError
from hybridserve_client.tasks import TASKS, TaskInfo, task_of


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, api_key=args.api_key, token=args.token, timeout=args.timeout, retries=args.retries)


def cmd_infer(args: argparse.Namespace) -> int:
    task = task_of(args.command)
    options = {option.name: getattr(args, option.name) for option in task.options}
    if task.reference:
        options["reference"] = args.reference
    with _client(args) as client:
        results = getattr(client, task.verb)(args.model, list(args.images), **options)
    for index, (image, result) in enumerate(zip(args.images, results, strict=True)):
        print(result.json_line() if args.json else result.describe(image))
        if getattr(args, "output", None):
            target = _output_path(Path(args.output), index, len(results))
            result.write(target, image)
            print(f"  wrote {target}", file=sys.stderr)
    return 0


def _output_path(output: Path, index: int, count: int) -> Path:
    return output if count == 1 else output.with_name(f"{output.stem}-{index}{output.suffix}")


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.models()
    if args.json:
        print(json.dumps([m.model_dump(mode="json") for m in models], indent=2))
        return 0
    width = max([len(m.name) for m in models] + [4])
    print(f"{'name':<{width}}  {'task':<14}  {'verb':<8}  {'status':<8}  architecture")
    for m in models:
        print(f"{m.name:<{width}}  {m.task:<14}  {m.verb:<8}  {m.status:<8}  {m.architecture}")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        live = client.live()
        health = client.health() if live else None
    print(f"live: {live}")
    if health is not None:
        print(f"ready: {health.status == 'ok'}")
        for name, status in sorted(health.models.items()):
            print(f"  {name}: {status}")
    return 0 if live and health is not None and health.status == "ok" else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from hybridserve_client import bench

    with _client(args) as client:
        info = client.model(args.model)
    if args.images:
        images = bench.load_images(Path(args.images))
    else:
        size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else (
            info.input.input_size or ((192, 192) if info.task == "iqa" else (64, 64)))
        images = bench.generated_images(size)  # type: ignore[arg-type]
    mode, levels = ("rate", args.rate) if args.rate else ("concurrency", args.concurrency)
    config = bench.BenchConfig(
        url=args.url, model=args.model, verb=info.verb, images=images, mode=mode,
        levels=[float(v) for v in levels.split(",")], duration=args.duration, warmup=args.warmup,
        engine=args.engine, timeout=args.timeout, needs_reference=info.input.needs_reference,
        api_key=args.api_key, token=args.token, progress=not args.no_progress)
    engine = bench.pick_engine(args.url, args.engine)
    print(f"bench {args.model} ({info.verb}) at {args.url}: engine {engine}, {len(images)} image(s), "
          f"{args.warmup:g} s warm-up + {args.duration:g} s per level")
    results = bench.run_bench(config)
    print(bench.table(results))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(bench.to_json(config, results), indent=2))
    if args.csv:
        Path(args.csv).write_text(bench.to_csv(results))
    return 0


def _task_command(sub: Any, common: argparse.ArgumentParser, task: TaskInfo) -> None:
    """The subcommand of one task, from the task table; -o as OUTPUTS says (required for image replies)."""
    command = sub.add_parser(task.verb, parents=[common], help=f"{task.summary} ({task.name} models)")
    command.add_argument("model")
    command.add_argument("images", nargs="+", help="image file(s)")
    command.add_argument("--json", action="store_true", help="print the raw JSON result")
    for option in task.options:
        command.add_argument(f"--{option.name.replace('_', '-')}", type=option.type, choices=option.choices,
                             default=option.default, help=option.help)
    if task.reference:
        command.add_argument("--reference", help="reference image (full-reference models)")
    if task.output:
        command.add_argument("-o", "--output", required=task.image_reply, help=task.output)
    command.set_defaults(handler=cmd_infer)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("url", help="server URL: http(s)://host:port or grpc://host:port")
    common.add_argument("--api-key", default=os.environ.get("HYBRIDSERVE_API_KEY"))
    common.add_argument("--token", default=os.environ.get("HYBRIDSERVE_TOKEN"), help="bearer token")
    common.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    common.add_argument("--retries", type=int, default=3, help="retries on 429/503/connection errors (default 3)")

    parser = argparse.ArgumentParser(prog="hybridserve-client", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    for task in TASKS:
        _task_command(sub, common, task)

    for name, handler, help_text in (("models", cmd_models, "list the served models"),
                                     ("health", cmd_health, "liveness and readiness")):
        command = sub.add_parser(name, parents=[common], help=help_text)
        command.add_argument("--json", action="store_true")
        command.set_defaults(handler=handler)

    bench = sub.add_parser("bench", parents=[common], help="load test one model (perf_analyzer style)")
    bench.add_argument("model")
    bench.add_argument("--images", help="folder of images to send (default: generated at the model's input size)")
    bench.add_argument("--size", help="HxW of generated images (default: the model's input size)")
    bench.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrency levels (default 1,8,32)")
    bench.add_argument("--rate", help="comma-separated request rates per second (open loop), instead of concurrency")
    bench.add_argument("--duration", type=float, default=10.0, help="measured seconds per level (default 10)")
    bench.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each level (default 2)")
    bench.add_argument("--engine", default="auto", choices=("auto", "aiohttp", "threads", "httpx", "grpc"))
    bench.add_argument("--json", dest="json_out", help="write the results as JSON to this file")
    bench.add_argument("--csv", help="write the results as CSV to this file")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(handler=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except HybridServeError as error:
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    except (OSError, TypeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
