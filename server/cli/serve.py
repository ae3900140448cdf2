"""``hybridserve serve`` on Ray: the local cluster (or ``--address``), Serve, and a graceful stop.

A local cluster gets a state folder of its own (``rayserve.haproxy.state_dir``, named for the
HTTP port) for HAProxy's files and the drain flag; a start stops a stale HAProxy left there by a
server that was killed. SIGTERM and SIGINT drain, then stop (``rayserve.cluster``), exit 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import socket
from pathlib import Path

DRAINING_PERIOD_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
PROXY_CHECK_ENV = "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S"
GATEWAY_PORTS = 32  # HTTP and gRPC ports a local cluster's gateway replicas may take (Ray's ranges are 1000)


def serve_ray(repository: str, specs, args: argparse.Namespace, banner) -> int:
    """Serve ``specs`` on Ray until SIGTERM/SIGINT; ``banner(args, specs, grpc, targets)`` prints the URLs."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from hybridserve.server.observability import metrics
    from hybridserve.server.rayserve import haproxy
    from hybridserve.server.rayserve.app import APP_NAME, AppArgs, app
    from hybridserve.server.rayserve.options import choose_layout
    from hybridserve.server.rayserve.cluster import Lifecycle, drain_grace_s

    grace_s = drain_grace_s(args.drain_grace_s)
    folder = flag = None
    if not args.address:  # a local cluster's processes inherit this environment (a remote one has its own)
        folder = haproxy.state_dir(args.port)
        stale = haproxy.claim(folder)
        if stale:
            print(f"Stopped the stale HAProxy of an earlier hybridserve serve on port {args.port} "
                  f"(pid {', '.join(map(str, stale))})", flush=True)
        flag = folder / "draining"
        flag.unlink(missing_ok=True)
        os.environ.update(local_serve_env(folder))
    # From the start: a SIGTERM while Ray starts or the models load shuts down cleanly once loading ends.
    lifecycle = Lifecycle(flag, grace_s, APP_NAME)
    lifecycle.install()
    import ray
    from ray import serve

    # A local cluster gets enough logical CPUs for every replica (combined: every gateway replica
    # asks for all the models' CPUs); torch threads follow each spec.
    wanted = args.ingress_replicas * sum(
        spec.device.cpus * (spec.autoscaling.min_replicas if spec.autoscaling else spec.replicas) for spec in specs)
    num_cpus = None if args.address else max(os.cpu_count() or 1, int(wanted + 0.999) + 1)
    ray.init(address=args.address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=args.verbose,
             configure_logging=True, logging_level=logging.INFO if args.verbose else logging.WARNING,
             _metrics_export_port=None if args.address else metrics.metrics_export_port(args.metrics_export_port))
    lifecycle.install()  # ray.init replaced our handlers with its own (which aborts)
    serve.start(
        http_options={"host": args.host, "port": args.port},
        grpc_options={"port": args.grpc_port, "grpc_servicer_functions": grpc_servicers()},
    )
    node_cpus = max(float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive"))
    layout, why = choose_layout(specs, args.layout, node_cpus)
    print(f"Loading {len(specs)} model(s) on Ray Serve, layout {layout}: {why} ...", flush=True)
    serve.run(app(AppArgs(repository=repository, device=args.device, layout=layout,
                          ingress_replicas=args.ingress_replicas)), name=APP_NAME, route_prefix="/")
    if not lifecycle.stop.is_set():
        banner(args, specs, grpc=bool(grpc_servicers()), metrics_targets=metrics.ray_metrics_targets())
    lifecycle.wait()
    lifecycle.shutdown()
    if folder is not None:
        haproxy.release(folder)
    print("Stopped.", flush=True)
    return 0


def local_serve_env(folder: Path | None = None) -> dict[str, str]:
    """What a local cluster adds to its environment for HAProxy ingress (variables already set win).

    HAProxy's stats and metrics ports move to free ones where taken. The gateway replicas' gRPC
    and HTTP ports, and those of Serve's fallback proxy behind HAProxy, get a block of their own:
    Ray 2.60 binds them with SO_REUSEPORT, so two local clusters on Ray's defaults would share a
    port and answer each other's calls. With a state
    ``folder`` (``hybridserve serve``), HAProxy keeps its files there and runs through our
    launcher, and the gateway replicas learn where the drain flag is.
    """
    from hybridserve.server.observability.metrics import metrics_export_port
    from hybridserve.server.rayserve import haproxy
    from hybridserve.server.rayserve.app import haproxy_binary, serve_env
    from hybridserve.server.rayserve.cluster import DRAIN_FLAG_ENV

    env = {key: value for key, value in serve_env().items() if key not in os.environ}
    if folder is not None:
        env[DRAIN_FLAG_ENV] = str(folder / "draining")
        # A stopping replica otherwise stays reachable 30 s for load balancers; HAProxy (a reload
        # away) and our drain (readiness 503 first) make that wait needless, and it would use up
        # Kubernetes' grace period.
        env.setdefault(DRAINING_PERIOD_ENV, os.environ.get(DRAINING_PERIOD_ENV, "2"))
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", env.get("RAY_SERVE_ENABLE_HA_PROXY")) != "1":
        return env
    # Serve checks its proxies (HAProxy's manager: is HAProxy running?) every 10 s and replaces
    # one after 3 failures: a crashed HAProxy left the ports closed for 30 s. Every 2 s here.
    if PROXY_CHECK_ENV not in os.environ:
        env[PROXY_CHECK_ENV] = "2"
    for key, port in (("RAY_SERVE_HAPROXY_STATS_PORT", 8404), ("RAY_SERVE_HAPROXY_METRICS_PORT", 9101)):
        if key not in os.environ:
            env[key] = str(metrics_export_port(port))
    block = _free_port_block(2 * GATEWAY_PORTS + 2)  # one block, split: the ranges cannot overlap
    for offset, kind in ((0, "GRPC"), (GATEWAY_PORTS, "HTTP")):
        if f"RAY_SERVE_DIRECT_INGRESS_MIN_{kind}_PORT" not in os.environ:
            env[f"RAY_SERVE_DIRECT_INGRESS_MIN_{kind}_PORT"] = str(block + offset)
            env[f"RAY_SERVE_DIRECT_INGRESS_MAX_{kind}_PORT"] = str(block + offset + GATEWAY_PORTS - 1)
    # Serve's own proxy stays up behind HAProxy as its fallback backend, on 8500/9500 by default,
    # also bound with SO_REUSEPORT: a second cluster there would answer the first one's requests.
    for offset, kind in ((2 * GATEWAY_PORTS, "HTTP"), (2 * GATEWAY_PORTS + 1, "GRPC")):
        if f"RAY_SERVE_FALLBACK_PROXY_{kind}_PORT" not in os.environ:
            env[f"RAY_SERVE_FALLBACK_PROXY_{kind}_PORT"] = str(block + offset)
    real_binary = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or haproxy_binary()
    if folder is not None and real_binary:
        moved = haproxy.haproxy_env(folder, real_binary)
        env.update({key: value for key, value in moved.items()
                    if key == "RAY_SERVE_HAPROXY_BINARY_PATH" or key not in os.environ})
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
    raise OSError(f"no {size} consecutive free ports for the gateway replicas' servers")


def grpc_servicers() -> list[str]:
    """gRPC servicers the Serve proxy registers (empty until the gRPC services are installed)."""
    try:
        from hybridserve.server.transports.grpc_services import SERVICER_FUNCTIONS
    except ImportError:
        return []
    return list(SERVICER_FUNCTIONS)
