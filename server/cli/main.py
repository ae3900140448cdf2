"""The ``hybridserve`` command: serve a model repository, list and check models, render configs."""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import socket
import sys
import threading
from pathlib import Path

from hybridserve.server.cli.deploy_render import add_deploy_parser
from hybridserve.server.evaluation.cli import add_eval_parser
from hybridserve.server.observability.logs import LOG_FORMAT_ENV, LOG_FORMATS, configure_logging
from hybridserve.server.core.spec import SpecError
from hybridserve.server.repository import builtin_repository, load_repository, load_spec

LAYOUTS = ("deployments", "combined")  # ray_app.Layout, without importing Ray here
GATEWAY_GRPC_PORTS = 32  # gRPC ports a local cluster's gateway replicas may take (Ray's range is 1000)


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
    return _serve_ray(str(repository), specs, args)


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
    import uvicorn

    from hybridserve.server.transports.http_api import create_http_app
    from hybridserve.server.engine.local import local_plane
    from hybridserve.server.engine.runtime import configure_threads

    configure_threads(os.cpu_count() or 1)
    plane = local_plane(specs, args.device)
    _banner(args, specs, grpc=False)
    uvicorn.run(create_http_app(plane), host=args.host, port=args.port, log_level="warning")
    return 0


def _serve_ray(repository: str, specs, args: argparse.Namespace) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from hybridserve.server.observability import metrics
    from hybridserve.server.rayserve.app import APP_NAME, AppArgs, app

    if not args.address:  # a local cluster's processes inherit this environment (a remote one has its own)
        os.environ.update(local_serve_env())
    import ray
    from ray import serve

    # From the start: a SIGTERM while Ray starts or the models load shuts down cleanly once loading ends.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # A local cluster gets enough logical CPUs for every replica; torch threads follow each spec.
    wanted = sum(spec.device.cpus * (spec.autoscaling.min_replicas if spec.autoscaling else spec.replicas)
                 for spec in specs)
    num_cpus = None if args.address else max(os.cpu_count() or 1, int(wanted + 0.999) + 1)
    ray.init(address=args.address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=args.verbose, configure_logging=True,
             logging_level=logging.INFO if args.verbose else logging.WARNING,
             _metrics_export_port=None if args.address else metrics.metrics_export_port(args.metrics_export_port))
    serve.start(
        http_options={"host": args.host, "port": args.port},
        grpc_options={"port": args.grpc_port, "grpc_servicer_functions": grpc_servicers()},
    )
    print(f"Loading {len(specs)} model(s) on Ray Serve ...", flush=True)
    serve.run(app(AppArgs(repository=repository, device=args.device, layout=args.layout)), name=APP_NAME,
              route_prefix="/")
    if not stop.is_set():
        _banner(args, specs, grpc=bool(grpc_servicers()), metrics_targets=metrics.ray_metrics_targets())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    print("Shutting down (draining in-flight requests) ...", flush=True)
    serve.shutdown()
    return 0


def local_serve_env() -> dict[str, str]:
    """What a local cluster adds to its environment for HAProxy ingress (variables already set win).

    HAProxy's stats and metrics ports move to free ones where taken. The gateway replicas' gRPC
    ports get a block of their own: Ray 2.60 binds them with SO_REUSEPORT, so two local clusters
    on Ray's default range would share a port and answer each other's calls.
    """
    from hybridserve.server.observability.metrics import metrics_export_port
    from hybridserve.server.rayserve.app import serve_env

    env = {key: value for key, value in serve_env().items() if key not in os.environ}
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", env.get("RAY_SERVE_ENABLE_HA_PROXY")) != "1":
        return env
    for key, port in (("RAY_SERVE_HAPROXY_STATS_PORT", 8404), ("RAY_SERVE_HAPROXY_METRICS_PORT", 9101)):
        if key not in os.environ:
            env[key] = str(metrics_export_port(port))
    if "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT" not in os.environ:
        low = _free_port_block(GATEWAY_GRPC_PORTS)
        env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"] = str(low)
        env["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"] = str(low + GATEWAY_GRPC_PORTS - 1)
    return env


def _free_port_block(size: int) -> int:
    """The first of ``size`` consecutive ports that nothing listens on (bound without SO_REUSEPORT)."""
    def free(port: int) -> bool:
        with socket.socket(socket.AF_INET6) as sock:  # [::] also covers IPv4, as gRPC binds
            try:
                sock.bind(("::", port))
            except OSError:
                return False
        return True

    for start in random.sample(range(42000, 60000 - size, size), 100):
        if all(free(port) for port in range(start, start + size)):
            return start
    raise OSError(f"no {size} consecutive free ports for the gateway's gRPC servers")


def grpc_servicers() -> list[str]:
    """gRPC servicers the Serve proxy registers (empty until the gRPC services are installed)."""
    try:
        from hybridserve.server.transports.grpc_services import SERVICER_FUNCTIONS
    except ImportError:
        return []
    return list(SERVICER_FUNCTIONS)


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
    serve_p.add_argument("--no-ray", action="store_true", help="serve in this process without Ray (HTTP only)")
    serve_p.add_argument("--layout", choices=LAYOUTS, default="deployments",
                         help="Ray: a deployment per model behind the gateway, or every model in the gateway "
                              "(combined: no hop, for small models; docs/performance.md)")
    serve_p.add_argument("--verbose", action="store_true")
    serve_p.add_argument("--log-format", choices=LOG_FORMATS, help=f"log lines as text or JSON (default: ${LOG_FORMAT_ENV} or text)")
    serve_p.add_argument("--metrics-export-port", type=int, default=8080,
                         help="Ray's Prometheus export port on a local cluster (KubeRay's 8080; another if taken)")
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
    config_p.add_argument("--layout", choices=LAYOUTS, default="deployments")
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
