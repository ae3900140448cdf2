"""Optional authentication (API keys / bearer tokens) shared by HTTP and gRPC.

Keys come from ``Settings`` (``HYBRIDSERVE_API_KEYS``, comma-separated, and/or
``HYBRIDSERVE_API_KEYS_FILE``, one per line). With no keys configured, authentication is off. A client sends
``X-API-Key: <key>`` or ``Authorization: Bearer <key>``; keys are compared in constant time.
Paths in ``Settings.open_paths`` (``HYBRIDSERVE_OPEN_PATHS``; health, metrics and docs by default) stay open. A refused
request gets 401 before routing, so it cannot learn whether a model exists.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hybridserve.server.core.errors import Unauthenticated
from hybridserve.server.core.settings import DEFAULT_OPEN_PATHS, Settings
from hybridserve.server.transports.http_base import error_response



@dataclass(frozen=True)
class AuthPolicy:
    keys: tuple[bytes, ...] = ()
    open_paths: tuple[str, ...] = DEFAULT_OPEN_PATHS

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    @classmethod
    def from_settings(cls, settings: Settings) -> AuthPolicy:
        return cls(settings.api_keys, settings.open_paths)

    def is_open(self, path: str) -> bool:
        return not self.enabled or path in self.open_paths

    def check(self, headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> None:
        """Raise Unauthenticated unless the headers (or gRPC metadata) carry a configured key."""
        if not self.enabled:
            return
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        given = None
        for name, value in pairs:
            name = name.lower()
            if name == "x-api-key":
                given = value
            elif name == "authorization" and value[:7].lower() == "bearer ":
                given = value[7:]
        if given is None:
            raise Unauthenticated("authentication required: send X-API-Key or Authorization: Bearer <key>")
        candidate = given.strip().encode()
        matched = False
        for key in self.keys:  # no early exit: timing does not tell which key matched
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise Unauthenticated("invalid API key or token")


class AuthMiddleware:
    """ASGI middleware that refuses unauthenticated HTTP requests before any routing."""

    def __init__(self, app, policy: AuthPolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.policy.is_open(_route_path(scope)):
            return await self.app(scope, receive, send)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", [])]
        try:
            self.policy.check(headers)
        except Unauthenticated as exc:

            response = error_response(exc)
            response.headers["WWW-Authenticate"] = "Bearer"
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _route_path(scope) -> str:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path
