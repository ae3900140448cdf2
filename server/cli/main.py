"""The ``hybridserve`` command: serve a model repository, list and check models, render configs."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from hybridserve.server.cli.deploy_render import add_deploy_parser
from hybridserve.server.cli.serve import grpc_servicers, serve_ray
from hybridserve.server.evaluation.cli import add_eval_parser
from hybridserve.server.observability.logs import LOG_FORMAT_ENV, LOG_FORMATS, configure_logging
from hybridserve.server.core.spec import SpecError
from hybridserve.server.repository import builtin_repository, load_repository, load_spec

LAYOUTS = ("auto", "deployments", "combined")  # rayserve.options.Layout, without importing Ray here
DRAIN_GRACE_S = 25.0  # in-flight gRPC calls get this long after SIGTERM (fits Kubernetes' 30 s)


def _repository(value: str | None) -> Path:
    return Path(value).resolve() if value else builtin_repository()


def cmd_models_list(args: argparse.Namespace) -> int:
    specs = load_repository(_repository(args.repository))
    width = max(len(s.name) for s in specs)
    for spec in specs:
        print(f"{spec.name:<{width}}  {spec.task:<14}  {spec.architecture}")
    return 0


def cmd_models_check(args: argparse.Namespace) -> int:
    """Validate every spec and load every model; one clear line per broken spec."""
    from hybridserve.server.engine.runtime import ModelRuntime, configure_threads

    configure_threads(os.cpu_count() or 1)
    folder = _repository(args.repository)
    broken, specs = 0, []
    for path in sorted(folder.glob("*.y*ml")):
        try:
            specs.append(load_spec(path))
        except SpecError as exc:
            print(f"FAIL {exc}")
            broken += 1
    for spec in specs:
        runtime = ModelRuntime(spec, args.device)
        runtime.load()
        if runtime.status == "ready":
            print(f"ok   {spec.name}: {spec.task}, {spec.architecture}, loaded and warmed up in {runtime.load_seconds:.2f}s")
        else:
            print(f"FAIL {spec.name} ({spec.base_dir}): {runtime.reason}")
            broken += 1
    print(f"{len(specs)} model(s) loaded, {broken} broken")
    return 1 if broken else 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from hybridserve.server.rayserve.app import serve_config

    config = serve_config(str(_repository(args.repository)), http_port=args.port, grpc_port=args.grpc_port,
                          device=args.device, grpc_servicer_functions=grpc_servicers(), layout=args.layout)
    print(yaml.safe_dump(config, sort_keys=False))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    os.environ[LOG_FORMAT_ENV] = configure_logging(args.log_format)  # Ray workers started here inherit it
    repository = _repository(args.repository)
    specs = load_repository(repository)  # fail fast, before Ray starts
    if args.no_ray:
        return _serve_local(specs, args)
    return serve_ray(str(repository), specs, args, _banner)


def _banner(args: argparse.Namespace, specs, grpc: bool, metrics_targets: list[str] | None = None) -> None:
    host = "localhost" if args.host in ("0.0.0.0", "::") else args.host
    base = f"http://{host}:{args.port}"
    print(f"\nhybridserve is serving {len(specs)} model(s) at {base}  (docs: {base}/docs)")
    if grpc:
        print(f"gRPC (hybridserve.v1 and the Open Inference Protocol): {host}:{args.grpc_port}")
    print(f"Prometheus metrics (docs/metrics.md): {', '.join(metrics_targets or [base + '/metrics'])}")
    for spec in specs:
        print(f"  POST {base}/v1/models/{spec.name}/{spec.verb}")
    first = specs[0]
    print(f"\nTry:  curl -s -X POST {base}/v1/models/{first.name}/{first.verb} "
          f"-H 'Content-Type: image/png' --data-binary @image.png\n", flush=True)


def _serve_local(specs, args: argparse.Namespace) -> int:
    """HTTP (uvicorn) and gRPC (grpc.aio) in this process over one data plane; SIGTERM drains both."""
    import asyncio

    import uvicorn

    from hybridserve.server.engine.local import local_plane
    from hybridserve.server.engine.runtime import configure_threads
    from hybridserve.server.core.settings import Settings
    from hybridserve.server.observability import runtime_metrics
    from hybridserve.server.transports.grpc_server import start_grpc_server
    from hybridserve.server.transports.http_api import create_http_app

    # Threads follow the specs (device.cpus), never more than the machine has: the batch threads
    # share one torch pool, and the event loop needs a core of its own on small machines.
    configure_threads(min(max(spec.device.cpus for spec in specs), os.cpu_count() or 1))
    settings = Settings.from_env()  # read once, passed down
    # Pre/postprocess threads: the cores the models' threads leave (one at least; runtime.work_pool).
    spare = (os.cpu_count() or 1) - sum(int(spec.device.cpus) for spec in specs)
    plane = local_plane(specs, args.device, settings.limits, runtime_metrics, work_threads=spare)

    async def serve() -> None:
        grpc_server = None if args.grpc_port == 0 else await start_grpc_server(plane, settings, args.host, args.grpc_port)
        _banner(args, specs, grpc=grpc_server is not None)
        config = uvicorn.Config(create_http_app(plane, settings), host=args.host, port=args.port, log_level="warning")
        try:
            await uvicorn.Server(config).serve()  # returns after SIGTERM/SIGINT, once in-flight requests finish
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=DRAIN_GRACE_S)

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve())
    return 0


def _loop_factory():
    """uvloop's event loop where installed (as Ray Serve's replicas run): less CPU per request than asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve_p = sub.add_parser("serve", help="serve a model repository")
    serve_p.add_argument("--repository", help="folder of *.yaml model specs (default: the built-in models)")
    serve_p.add_argument("--host", default="0.0.0.0")
    serve_p.add_argument("--port", type=int, default=8000)
    serve_p.add_argument("--grpc-port", type=int, default=9000)
    serve_p.add_argument("--device", choices=["cpu", "cuda"], help="override every spec's device")
    serve_p.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    serve_p.add_argument("--no-ray", action="store_true", help="serve in this process without Ray (HTTP and gRPC; --grpc-port 0: HTTP only)")
    serve_p.add_argument("--layout", choices=LAYOUTS, default="auto",
                         help="Ray: every model in the gateway (combined: no hop), or a deployment per model "
                              "reached once per batch; auto picks combined where the models fit one node "
                              "as one unit (docs/performance.md)")
    serve_p.add_argument("--ingress-replicas", type=int, default=1,
                         help="Ray: gateway replicas, each its own process that parses HTTP and gRPC, decodes and "
                              "batches (combined layout: each also holds every model)")
    serve_p.add_argument("--verbose", action="store_true")
    serve_p.add_argument("--log-format", choices=LOG_FORMATS, help=f"log lines as text or JSON (default: ${LOG_FORMAT_ENV} or text)")
    serve_p.add_argument("--metrics-export-port", type=int, default=8080,
                         help="Ray's Prometheus export port on a local cluster (KubeRay's 8080; another if taken)")
    serve_p.add_argument("--drain-grace-s", type=float, default=None,
                         help="Ray: on SIGTERM/SIGINT, how long to wait for in-flight requests before stopping "
                              "(default: $HYBRIDSERVE_DRAIN_GRACE_S or 20; docs/operations.md)")
    serve_p.set_defaults(func=cmd_serve)

    models_p = sub.add_parser("models", help="inspect model repositories")
    models_sub = models_p.add_subparsers(dest="models_command", required=True)
    list_p = models_sub.add_parser("list", help="list the models of a repository")
    list_p.add_argument("--repository")
    list_p.set_defaults(func=cmd_models_list)
    check_p = models_sub.add_parser("check", help="validate every spec and load every model")
    check_p.add_argument("repository", nargs="?")
    check_p.add_argument("--device", choices=["cpu", "cuda"])
    check_p.set_defaults(func=cmd_models_check)

    config_p = sub.add_parser("config", help="print the Ray Serve config file for a repository")
    config_p.add_argument("--repository")
    config_p.add_argument("--port", type=int, default=8000)
    config_p.add_argument("--grpc-port", type=int, default=9000)
    config_p.add_argument("--device", choices=["cpu", "cuda"])
    config_p.add_argument("--layout", choices=LAYOUTS, default="auto")
    config_p.set_defaults(func=cmd_config)

    add_deploy_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
