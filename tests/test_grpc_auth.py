"""API keys on the gRPC services: the same policy as HTTP, checked on the call's metadata."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from hybridserve_client._grpc.hybridserve.oip.v2 import open_inference_pb2 as oip_pb
from hybridserve_client._grpc.hybridserve.v1 import hybridserve_pb2 as v1
from hybridserve.server.transports import grpc_services
from hybridserve.server.engine.local import local_plane
from hybridserve.server.core.settings import Settings
from hybridserve.server.repository import builtin_repository, load_spec


class CallContext:
    """The part of grpc's servicer context the services use, recording what they set."""

    def __init__(self, metadata):
        self.metadata, self.code, self.details, self.trailing = list(metadata), None, None, []

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, metadata):
        self.trailing = list(metadata)


class Services(grpc_services.TaskServicerMixin, grpc_services.OIPServicerMixin):
    def __init__(self, settings: Settings):
        self.init_services(local_plane([load_spec(builtin_repository() / "psnr.yaml")]), settings)


@pytest.fixture
def services():
    return Services(Settings.from_env({"HYBRIDSERVE_API_KEYS": "sesame"}))


@pytest.mark.parametrize("metadata", [[], [("x-api-key", "wrong")], [("authorization", "Bearer nope")]])
def test_calls_without_a_valid_key_are_unauthenticated(services, metadata):
    context = CallContext(metadata)
    asyncio.run(services.ListModels(v1.ListModelsRequest(), context))
    assert context.code == grpc.StatusCode.UNAUTHENTICATED
    assert ("hybridserve-error-code", "unauthenticated") in context.trailing


@pytest.mark.parametrize("metadata", [[("x-api-key", "sesame")], [("authorization", "Bearer sesame")]])
def test_a_valid_key_passes(services, metadata):
    context = CallContext(metadata)
    reply = asyncio.run(services.ListModels(v1.ListModelsRequest(), context))
    assert context.code is None and [m.name for m in reply.models] == ["psnr"]


def test_health_rpcs_stay_open(services):
    context = CallContext([])
    assert asyncio.run(services.ServerLive(oip_pb.ServerLiveRequest(), context)).live
    assert context.code is None
