"""hybridserve.server: specs, tasks, the engine, its transports (HTTP, gRPC, OIP) and the Ray app.

The names below are the stable entry points, and the one interface ``hybridserve.models`` uses
(its training scripts read the specs they train for and resize as the server does). Everything
Ray-specific lives in ``hybridserve.server.rayserve`` so that importing this package never starts
or needs Ray.
"""

from hybridserve.server.core.errors import ERROR_TABLE, HybridServeError
from hybridserve.server.core.images import resize_for_model
from hybridserve.server.core.settings import Settings
from hybridserve.server.core.spec import ModelSpec, SpecError
from hybridserve.server.engine.dataplane import DataPlane
from hybridserve.server.engine.local import local_plane
from hybridserve.server.repository import builtin_repository, load_repository, load_spec
from hybridserve.server.tasks import TASKS
from hybridserve.server.transports.http_api import create_http_app

__all__ = [
    "ERROR_TABLE",
    "TASKS",
    "DataPlane",
    "HybridServeError",
    "ModelSpec",
    "Settings",
    "SpecError",
    "builtin_repository",
    "create_http_app",
    "load_repository",
    "load_spec",
    "local_plane",
    "resize_for_model",
]
