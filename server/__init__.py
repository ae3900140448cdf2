"""hybridserve.server: specs, handlers, the data plane and its HTTP/gRPC adapters, the Ray app.

The names below are the stable entry points; everything Ray-specific lives in
``hybridserve.server.rayserve.app`` so that importing this package never starts or needs Ray.
"""

from hybridserve.server.engine.dataplane import DataPlane
from hybridserve.server.core.errors import ERROR_TABLE, HybridServeError
from hybridserve.server.transports.http_api import create_http_app
from hybridserve.server.engine.local import local_plane
from hybridserve.server.core.spec import ModelSpec, SpecError
from hybridserve.server.repository import builtin_repository, load_repository, load_spec

__all__ = [
    "ERROR_TABLE",
    "DataPlane",
    "HybridServeError",
    "ModelSpec",
    "SpecError",
    "builtin_repository",
    "create_http_app",
    "load_repository",
    "load_spec",
    "local_plane",
]
