"""The gRPC services in this process (grpc.aio): what ``hybridserve serve --no-ray`` listens with.

The same servicer classes Ray Serve's gRPC proxy calls on the gateway (``grpc_services``) run
here over a local data plane: typed ``hybridserve.v1`` and the Open Inference Protocol's
``inference.GRPCInferenceService``, so tritonclient's gRPC client works without Ray.
"""

from __future__ import annotations

import importlib

import grpc

from hybridserve.server.core.settings import Settings
from hybridserve.server.engine.dataplane import DataPlane
from hybridserve.server.transports.grpc_services import SERVICER_FUNCTIONS, OIPServicerMixin, TaskServicerMixin

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class GRPCServices(TaskServicerMixin, OIPServicerMixin):
    """Both services over one data plane."""

    def __init__(self, plane: DataPlane, settings: Settings):
        self.init_services(plane, settings)


def _adder(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


async def start_grpc_server(plane: DataPlane, settings: Settings, host: str, port: int,
                            max_message_bytes: int = MAX_MESSAGE_BYTES) -> grpc.aio.Server:
    """Start serving both services on ``host:port``; the caller stops it (``await server.stop(grace)``)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", max_message_bytes)])
    services = GRPCServices(plane, settings)
    for path in SERVICER_FUNCTIONS:
        _adder(path)(services, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"gRPC cannot listen on {address}")
    await server.start()
    return server
