"""The local Ray cluster's lifecycle: signals, drain, shutdown (``hybridserve serve`` on Ray).

On SIGTERM or SIGINT (Kubernetes, systemd, ``docker stop``, Ctrl-C) ``Lifecycle``:

1. drains: it creates the cluster's *drain flag* (a file in its state folder, named to every
   replica by ``HYBRIDSERVE_DRAIN_FLAG``); from then on every gateway replica answers
   ``GET /readyz`` with 503, so a load balancer stops sending, and new inference calls over
   HTTP with 503 ``model_not_ready`` and ``Retry-After`` (``DrainGuard``). What was admitted
   before, queued or running, goes on;
2. waits until no Serve replica of the application has a request in flight, at most
   ``grace_s`` (``--drain-grace-s``, ``HYBRIDSERVE_DRAIN_GRACE_S``; default 20 s: with the
   few seconds the shutdown takes it fits Kubernetes' default 30 s grace period);
3. shuts Serve and the local cluster down and reports; ``hybridserve serve`` then exits 0.

Ray's ``ray.init`` installs its own SIGTERM handler (which aborts the process), so the handlers
are installed before Ray starts and again once it has.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

DRAIN_FLAG_ENV = "HYBRIDSERVE_DRAIN_FLAG"
DRAIN_GRACE_ENV = "HYBRIDSERVE_DRAIN_GRACE_S"
DEFAULT_DRAIN_GRACE_S = 20.0
REPLICA_PREFIX = "SERVE_REPLICA::"
POLL_S = 0.1
DRAINING_MESSAGE = "the server is shutting down (draining); retry, another replica or server will answer"

log = logging.getLogger("hybridserve.ray")


def drain_grace_s(value: float | None) -> float:
    """The drain's bound: the flag's value, else ``HYBRIDSERVE_DRAIN_GRACE_S``, else 20 s."""
    if value is None:
        raw = os.environ.get(DRAIN_GRACE_ENV)
        try:
            value = DEFAULT_DRAIN_GRACE_S if raw is None else float(raw)
        except ValueError:
            raise SystemExit(f"error: {DRAIN_GRACE_ENV}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise SystemExit(f"error: the drain grace period must be >= 0 seconds, not {value}")
    return value


class DrainGuard:
    """ASGI middleware of the gateway: while the drain flag exists, readiness and new calls get 503."""

    def __init__(self, app, flag: str):
        self.app = app
        self.flag = flag

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and os.path.exists(self.flag):
            path = scope["path"]
            if path == "/readyz":
                return await _json(send, 503, b'{"status":"unavailable","models":{}}', {})
            if scope["method"] == "POST" and path.startswith(("/v1/models/", "/v2/models/")):
                body = ('{"error":{"code":"model_not_ready","message":"%s"}}' % DRAINING_MESSAGE).encode()
                return await _json(send, 503, body, {b"retry-after": b"1"})
        await self.app(scope, receive, send)


async def _json(send, status: int, body: bytes, headers: dict[bytes, bytes]) -> None:
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            *headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def guard_draining(app):
    """The gateway's FastAPI app, with ``DrainGuard`` where the cluster names a drain flag."""
    flag = os.environ.get(DRAIN_FLAG_ENV)
    if flag:
        app.add_middleware(DrainGuard, flag=flag)
    return app


class Lifecycle:
    """Signals in, drain, Serve and Ray down: one per ``hybridserve serve`` on Ray."""

    def __init__(self, flag: Path | None, grace_s: float, app_name: str):
        self.flag = flag
        self.grace_s = grace_s
        self.app_name = app_name
        self.stop = threading.Event()
        self.signal_name: str | None = None

    def install(self) -> None:
        """(Re)install our SIGTERM and SIGINT handlers; call after ``ray.init``, which replaces them."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        if not self.stop.is_set():
            self.signal_name = signal.Signals(signum).name
        self.stop.set()

    def wait(self) -> None:
        while not self.stop.wait(0.5):
            pass

    def in_flight(self) -> int:
        """Requests queued or running in the application's Serve replicas (-1 if none answered)."""
        import ray

        names = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
                 if actor["name"].startswith(f"{REPLICA_PREFIX}{self.app_name}#")]
        counts = []
        for name in names:
            try:
                counts.append(ray.get_actor(name, namespace="serve").get_num_ongoing_requests.remote())
            except ValueError:  # the replica went away meanwhile
                continue
        try:
            return sum(ray.get(counts, timeout=2.0)) if counts else -1
        except Exception:  # a replica died while answering: count again on the next poll
            return 1

    def drain(self) -> tuple[float, int]:
        """Flag the drain, wait for what is in flight (at most ``grace_s``): (seconds, requests left)."""
        started = time.monotonic()
        if self.flag is not None:
            self.flag.touch()
        left = self.in_flight()
        while left > 0 and time.monotonic() - started < self.grace_s:
            time.sleep(POLL_S)
            left = self.in_flight()
        return time.monotonic() - started, max(left, 0)

    def shutdown(self) -> None:
        """Drain, then Serve and the local cluster down; prints what happened."""
        from ray import serve
        import ray

        print(f"{self.signal_name or 'Stop'} received: draining (readiness 503, new requests 503; "
              f"waiting up to {self.grace_s:g}s for in-flight requests) ...", flush=True)
        seconds, left = self.drain()
        if left:
            print(f"{left} request(s) still in flight after the {self.grace_s:g}s grace period: stopping anyway",
                  flush=True)
        else:
            print(f"Drained in {seconds:.1f}s; shutting down Serve and Ray ...", flush=True)
        serve.shutdown()
        ray.shutdown()
        if self.flag is not None:
            self.flag.unlink(missing_ok=True)
