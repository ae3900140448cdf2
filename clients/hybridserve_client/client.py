"""``Client`` (blocking) and ``AsyncClient`` (asyncio): the I/O on top of ``BaseClient``.

Both send operations through a pluggable transport (HTTP via httpx, or gRPC), retry what the
retry policy allows, and run a list of images concurrently with at most ``max_in_flight``
requests outstanding (threads for ``Client``, tasks for ``AsyncClient``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hybridserve_client._base import (
    DEFAULT_TIMEOUT_S,
    AsyncTransport,
    BaseClient,
    Operation,
    OperationKind,
    Result,
    Transport,
    WireProtocol,
)
from hybridserve_client.exceptions import HybridServeError, Unavailable


def _grpc_module():
    try:
        from hybridserve_client import _grpc_transport
    except ImportError as exc:
        raise ImportError(f"the gRPC transport needs the grpc extra: pip install 'hybridserve-client[grpc]' ({exc})") \
            from exc
    return _grpc_transport


def default_transport(client: BaseClient, asynchronous: bool, verify: bool | str) -> Any:
    """The transport for the client's protocol and URL."""
    if client.protocol == "http":
        from hybridserve_client._http import AsyncHTTPTransport, HTTPTransport

        kind = AsyncHTTPTransport if asynchronous else HTTPTransport
        return kind(client.url, verify=verify, max_in_flight=client.max_in_flight)
    module = _grpc_module()
    kind = module.AsyncGRPCTransport if asynchronous else module.GRPCTransport
    return kind(client.url)


class Client(BaseClient):
    """Blocking client; thread-safe. Use as a context manager, or call ``close()``.

    >>> with Client("http://localhost:8000") as client:          # doctest: +SKIP
    ...     print(client.classify("classifier", "digit.png").top1.label)
    """

    def __init__(self, url: str, *, api_key: str | None = None, token: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT_S, retries: int = 3, transport: Transport | None = None,
                 protocol: WireProtocol | None = None, max_in_flight: int = 8, verify: bool | str = True,
                 backoff: float = 0.5, max_backoff: float = 10.0):
        super().__init__(url, api_key=api_key, token=token, timeout=timeout, retries=retries, protocol=protocol,
                         max_in_flight=max_in_flight, backoff=backoff, max_backoff=max_backoff)
        self.transport: Transport = transport or default_transport(self, False, verify)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        self.transport.close()

    def _send(self, operation: Operation) -> Result:
        attempt = 0
        while True:
            try:
                return self.transport.handle(operation)
            except HybridServeError as error:
                delay = self.retry_policy.delay(attempt, error)
                if delay is None:
                    raise
            time.sleep(delay)
            attempt += 1

    def _infer(self, verb: str, model: str, image: Any, reference: Any, options: dict[str, Any]) -> Any:
        pairs = self._pairs(image, reference)
        if pairs is None:
            return self._send(self._inference(verb, model, image, reference, options))
        if not pairs:
            return []
        pool = ThreadPoolExecutor(min(self.max_in_flight, len(pairs)), thread_name_prefix="hybridserve")
        try:
            futures = [pool.submit(lambda pair: self._send(self._inference(verb, model, *pair, options)), pair)
                       for pair in pairs]
            return [future.result() for future in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _call(self, operation: Operation, pick: Callable[[Any], Any]) -> Any:
        return pick(self._send(operation))

    def _probe(self, kind: OperationKind) -> bool:
        try:
            return self.transport.handle(self._operation(kind)).status == "ok"
        except Unavailable:
            return False


class AsyncClient(BaseClient):
    """Asyncio client: the same methods as ``Client``, awaited. Use ``async with`` or ``await aclose()``."""

    def __init__(self, url: str, *, api_key: str | None = None, token: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT_S, retries: int = 3,
                 transport: AsyncTransport | None = None, protocol: WireProtocol | None = None,
                 max_in_flight: int = 8, verify: bool | str = True, backoff: float = 0.5, max_backoff: float = 10.0):
        super().__init__(url, api_key=api_key, token=token, timeout=timeout, retries=retries, protocol=protocol,
                         max_in_flight=max_in_flight, backoff=backoff, max_backoff=max_backoff)
        self.transport: AsyncTransport = transport or default_transport(self, True, verify)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def _send(self, operation: Operation) -> Result:
        attempt = 0
        while True:
            try:
                return await self.transport.handle(operation)
            except HybridServeError as error:
                delay = self.retry_policy.delay(attempt, error)
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            attempt += 1

    async def _infer(self, verb: str, model: str, image: Any, reference: Any, options: dict[str, Any]) -> Any:
        pairs = self._pairs(image, reference)
        if pairs is None:
            return await self._send(self._inference(verb, model, image, reference, options))
        gate = asyncio.Semaphore(self.max_in_flight)

        async def one(item: Any, item_reference: Any) -> Result:
            async with gate:
                return await self._send(self._inference(verb, model, item, item_reference, options))

        tasks = [asyncio.ensure_future(one(*pair)) for pair in pairs]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _call(self, operation: Operation, pick: Callable[[Any], Any]) -> Any:
        return pick(await self._send(operation))

    async def _probe(self, kind: OperationKind) -> bool:
        try:
            return (await self.transport.handle(self._operation(kind))).status == "ok"
        except Unavailable:
            return False
