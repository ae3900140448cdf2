"""Server settings: read once from the environment where a server process starts, then passed down.

Every ``HYBRIDSERVE_*`` variable that docs/operations.md documents for the serving path is read
here and nowhere else (the compile cache, log format and drain settings belong to their own
start-up code). ``Settings.from_env`` runs in ``hybridserve serve --no-ray`` once, and under Ray
once in each replica's constructor (replicas inherit the cluster's environment).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hybridserve.server.core.images import ImageLimits

DEFAULT_OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready", "/docs",
                      "/openapi.json")


@dataclass(frozen=True)
class Settings:
    max_body_bytes: int = 32 * 1024 * 1024
    request_timeout_s: float = 60.0  # default deadline of a request that names none
    max_timeout_s: float = 600.0  # the longest deadline a request may ask for
    cors_origins: tuple[str, ...] = ()
    limits: ImageLimits = ImageLimits()
    api_keys: tuple[bytes, ...] = ()  # none: authentication is off
    open_paths: tuple[str, ...] = DEFAULT_OPEN_PATHS

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        def number(name: str, default: float, kind: type = int):
            raw = env.get(name)
            if raw is None or not raw.strip():
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a {kind.__name__}") from None
            if value <= 0:
                raise ValueError(f"{name}={raw!r} must be positive")
            return value

        keys = [k.strip() for k in env.get("HYBRIDSERVE_API_KEYS", "").split(",") if k.strip()]
        if env.get("HYBRIDSERVE_API_KEYS_FILE"):
            keys += [line.strip() for line in Path(env["HYBRIDSERVE_API_KEYS_FILE"]).read_text().splitlines()
                     if line.strip()]
        open_paths = env.get("HYBRIDSERVE_OPEN_PATHS")
        return cls(
            max_body_bytes=number("HYBRIDSERVE_MAX_BODY_BYTES", cls.max_body_bytes),
            request_timeout_s=number("HYBRIDSERVE_REQUEST_TIMEOUT_S", cls.request_timeout_s, float),
            cors_origins=tuple(o.strip() for o in env.get("HYBRIDSERVE_CORS_ORIGINS", "").split(",") if o.strip()),
            limits=ImageLimits(max_pixels=number("HYBRIDSERVE_MAX_IMAGE_PIXELS", ImageLimits.max_pixels),
                               max_side=number("HYBRIDSERVE_MAX_IMAGE_SIDE", ImageLimits.max_side)),
            api_keys=tuple(k.encode() for k in keys),
            open_paths=DEFAULT_OPEN_PATHS if open_paths is None else tuple(
                p.strip() for p in open_paths.split(",") if p.strip()),
        )
