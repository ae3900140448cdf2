"""The HTTP server's one ASGI middleware: request id, authentication and the disconnect watch.

Per HTTP request, in this order:

1. **Request id** (in-process; under Ray Serve its proxy settles and returns the id): taken from
   ``X-Request-ID`` or ``traceparent`` or made up, written into the request's ``x-request-id``
   header (so handlers read one value), bound to every log line of the request and returned in
   the response's ``X-Request-ID``.
2. **Authentication** (when API keys are configured): a request without a valid key gets 401
   before any routing, so it cannot learn whether a model exists; ``Settings.open_paths`` stay
   open (``transports/auth.py``).
3. **Disconnect watch**: uvicorn never cancels an app on its own. Once the app has read the whole
   body, a watcher waits on ``receive()``, which the server then answers only with
   ``http.disconnect`` (client gone, or the response complete); a client gone before the answer
   starts cancels the request's task. A cancelled request leaves no answer, a 499 in the request
   log and metrics, and no error; its queued items are dropped before compute.

4. **Direct routes**: ``direct(scope)`` may name a handler that answers the request itself,
   past the framework's routing (``http_api``: inference without a query string, the hot path);
   otherwise the app routes it.

One layer, not three: each layer costs calls and a wrapped ``send`` per message on every request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from starlette.datastructures import MutableHeaders

from hybridserve.server.core.errors import Unauthenticated
from hybridserve.server.observability import metrics
from hybridserve.server.observability.logs import bind_request_id, new_request_id, release_request_id, request_id_from
from hybridserve.server.transports.auth import AuthPolicy
from hybridserve.server.transports.http_base import error_response

log = logging.getLogger("hybridserve.http")


ASGIApp = Callable[[dict, Any, Any], Awaitable[None]]


class RequestMiddleware:
    def __init__(self, app: Any, policy: AuthPolicy, echo_request_id: bool = True,
                 direct: Callable[[dict], ASGIApp | None] | None = None):
        self.app = app
        self.policy = policy
        self.echo_request_id = echo_request_id
        self.direct = direct

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = None
        if self.echo_request_id:
            headers = MutableHeaders(scope=scope)
            request_id = request_id_from(headers.get("x-request-id"), headers.get("traceparent")) or new_request_id()
            headers["x-request-id"] = request_id
            send = _answering_with_id(send, request_id)
            token = bind_request_id(request_id)
        try:
            if not self.policy.is_open(route_path(scope)):
                try:
                    self.policy.check([(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", [])])
                except Unauthenticated as exc:
                    response = error_response(exc)
                    response.headers["WWW-Authenticate"] = "Bearer"
                    await response(scope, receive, send)
                    return
            await self._cancel_on_disconnect(scope, receive, send)
        finally:
            if token is not None:
                release_request_id(token)

    async def _cancel_on_disconnect(self, scope: dict, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        watcher: asyncio.Task | None = None
        responding = client_gone = False

        async def watch() -> dict:
            nonlocal client_gone
            message = await receive()
            if message["type"] == "http.disconnect" and not responding:
                client_gone = True
                task.cancel()
            return message

        async def receive_then_watch() -> dict:
            nonlocal watcher
            if watcher is not None:  # the app reads past its body: the next message is the watcher's
                return await asyncio.shield(watcher)
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                watcher = asyncio.create_task(watch())
            return message

        async def send_noting_start(message: dict) -> None:
            nonlocal responding
            responding = responding or message["type"] == "http.response.start"
            await send(message)

        app = (self.direct and self.direct(scope)) or self.app
        try:
            await app(scope, receive_then_watch, send_noting_start)
        except asyncio.CancelledError:
            metrics.request_cancelled()
            if client_gone and task.uncancel() == 0:  # only this watcher cancelled it: nothing more to do
                log.debug("client disconnected before the answer: request cancelled")
                return
            raise
        finally:
            if watcher is not None:
                watcher.cancel()


def _answering_with_id(send: Any, request_id: str) -> Any:
    async def send_with_id(message: dict) -> None:
        if message["type"] == "http.response.start":
            answer = MutableHeaders(scope=message)
            if "x-request-id" not in answer:
                answer.append("X-Request-ID", request_id)
        await send(message)

    return send_with_id


def route_path(scope: dict) -> str:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path
