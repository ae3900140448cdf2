"""Optional authentication (API keys / bearer tokens) shared by HTTP and gRPC.

Keys come from ``Settings`` (``HYBRIDSERVE_API_KEYS``, comma-separated, and/or
``HYBRIDSERVE_API_KEYS_FILE``, one per line). With no keys configured, authentication is off. A client sends
``X-API-Key: <key>`` or ``Authorization: Bearer <key>``; keys are compared in constant time.
Paths in ``Settings.open_paths`` (``HYBRIDSERVE_OPEN_PATHS``; health, metrics and docs by default) stay open. A refused
HTTP request gets 401 before routing (``transports/middleware.py``), so it cannot learn whether
a model exists.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hybridserve.server.core.errors import Unauthenticated
from hybridserve.server.core.settings import DEFAULT_OPEN_PATHS, Settings


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
