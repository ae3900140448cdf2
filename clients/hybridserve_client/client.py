"""``Client`` (blocking) and ``AsyncClient`` (asyncio): the I/O on top of ``BaseClient``.

Both send operations through a pluggable transport (HTTP via httpx, or gRPC), retry what the
retry policy allows, and run a list of images concurrently with at most ``max_in_flight``
requests outstanding (threads for ``Client``, tasks for ``AsyncClient``). Each spells out the
API with its return types, as httpx's two clients do: one method per task of the task table
(``tasks.py``; the method is named after the verb), then the metadata and health calls. A
list of images gives a list of results, in order; ``timeout=`` overrides the client's timeout
for that call.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast, overload

from hybridserve_client._base import (
    DEFAULT_TIMEOUT_S,
    USE_CLIENT_DEFAULT,
    AsyncTransport,
    BaseClient,
    Operation,
    OperationKind,
    Result,
    TimeoutArg,
    Transport,
    WireProtocol,
)
from hybridserve_client.exceptions import HybridServeError, Unavailable
from hybridserve_client.inputs import ImageBatch, ImageInput
from hybridserve_client.results import (
    AssessmentResult,
    ClassificationResult,
    DetectionResult,
    RestoredImage,
    SegmentationResult,
)
from hybridserve_client.schemas import Health, ModelInfo, ModelList

_DEFAULT = USE_CLIENT_DEFAULT


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

    # ------------------------------------------------------------ tasks

    @overload
    def classify(self, model: str, image: ImageInput, top_k: int | None = None, *,
                 timeout: TimeoutArg = _DEFAULT) -> ClassificationResult: ...
    @overload
    def classify(self, model: str, image: ImageBatch, top_k: int | None = None, *,
                 timeout: TimeoutArg = _DEFAULT) -> list[ClassificationResult]: ...
    def classify(self, model, image, top_k=None, *, timeout=_DEFAULT):
        """Classify an image: the ``top_k`` classes by score (``.top1`` is the best)."""
        return self._infer("classify", model, image, None, {"top_k": top_k}, timeout)

    @overload
    def detect(self, model: str, image: ImageInput, score_threshold: float | None = None,
               max_detections: int | None = None, *, timeout: TimeoutArg = _DEFAULT) -> DetectionResult: ...
    @overload
    def detect(self, model: str, image: ImageBatch, score_threshold: float | None = None,
               max_detections: int | None = None, *, timeout: TimeoutArg = _DEFAULT) -> list[DetectionResult]: ...
    def detect(self, model, image, score_threshold=None, max_detections=None, *, timeout=_DEFAULT):
        """Detect objects: boxes in input-image pixels, labels and scores."""
        options = {"score_threshold": score_threshold, "max_detections": max_detections}
        return self._infer("detect", model, image, None, options, timeout)

    @overload
    def restore(self, model: str, image: ImageInput, format: str = "png", *,
                timeout: TimeoutArg = _DEFAULT) -> RestoredImage: ...
    @overload
    def restore(self, model: str, image: ImageBatch, format: str = "png", *,
                timeout: TimeoutArg = _DEFAULT) -> list[RestoredImage]: ...
    def restore(self, model, image, format="png", *, timeout=_DEFAULT):
        """Super-resolve or denoise (``.image()`` is a PIL image, ``.array()`` numpy, ``.data`` the bytes)."""
        return self._infer("restore", model, image, None, {"format": format}, timeout)

    @overload
    def assess(self, model: str, image: ImageInput, reference: ImageInput | None = None, *,
               timeout: TimeoutArg = _DEFAULT) -> AssessmentResult: ...
    @overload
    def assess(self, model: str, image: ImageBatch, reference: ImageInput | ImageBatch | None = None, *,
               timeout: TimeoutArg = _DEFAULT) -> list[AssessmentResult]: ...
    def assess(self, model, image, reference=None, *, timeout=_DEFAULT):
        """Score image quality; full-reference models need ``reference`` (one for all, or one per image)."""
        return self._infer("assess", model, image, reference, {}, timeout)

    @overload
    def segment(self, model: str, image: ImageInput, format: str = "png", *,
                timeout: TimeoutArg = _DEFAULT) -> SegmentationResult: ...
    @overload
    def segment(self, model: str, image: ImageBatch, format: str = "png", *,
                timeout: TimeoutArg = _DEFAULT) -> list[SegmentationResult]: ...
    def segment(self, model, image, format="png", *, timeout=_DEFAULT):
        """Label every pixel: the classes present, and the mask (``.mask_array()``, ``.mask_png()``), which
        travels as a PNG (``format="png"``) or as each class's run lengths (``"rle"``)."""
        return self._infer("segment", model, image, None, {"format": format}, timeout)

    # ------------------------------------------------------------ metadata and health

    def models(self, *, timeout: TimeoutArg = _DEFAULT) -> list[ModelInfo]:
        """Every served model."""
        return cast(ModelList, self._send(self._operation("models", timeout))).models

    def model(self, name: str, *, timeout: TimeoutArg = _DEFAULT) -> ModelInfo:
        """One model's description; ModelNotFound if there is none."""
        return cast(ModelInfo, self._send(self._operation("model", timeout, model=name)))

    def health(self, *, timeout: TimeoutArg = _DEFAULT) -> Health:
        """Readiness with each model's status, whether or not all are ready."""
        return cast(Health, self._send(self._operation("ready", timeout)))

    def ready(self, *, timeout: TimeoutArg = _DEFAULT) -> bool:
        """True when every model is loaded and warmed up; False when not, or when unreachable."""
        return self._probe("ready", timeout)

    def live(self, *, timeout: TimeoutArg = _DEFAULT) -> bool:
        """True when the server answers its liveness probe; False when unreachable."""
        return self._probe("live", timeout)

    # ------------------------------------------------------------ sending

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

    def _infer(self, verb: str, model: str, image: Any, reference: Any, options: dict[str, Any],
               timeout: TimeoutArg) -> Any:
        pairs = self._pairs(image, reference)
        if pairs is None:
            return self._send(self._inference(verb, model, image, reference, options, timeout))
        if not pairs:
            return []
        pool = ThreadPoolExecutor(min(self.max_in_flight, len(pairs)), thread_name_prefix="hybridserve")
        try:
            futures = [pool.submit(lambda pair: self._send(self._inference(verb, model, *pair, options, timeout)),
                                   pair) for pair in pairs]
            return [future.result() for future in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _probe(self, kind: OperationKind, timeout: TimeoutArg) -> bool:
        try:
            return cast(Health, self.transport.handle(self._operation(kind, timeout))).status == "ok"
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

    # ------------------------------------------------------------ tasks

    @overload
    async def classify(self, model: str, image: ImageInput, top_k: int | None = None, *,
                       timeout: TimeoutArg = _DEFAULT) -> ClassificationResult: ...
    @overload
    async def classify(self, model: str, image: ImageBatch, top_k: int | None = None, *,
                       timeout: TimeoutArg = _DEFAULT) -> list[ClassificationResult]: ...
    async def classify(self, model, image, top_k=None, *, timeout=_DEFAULT):
        """Classify an image: the ``top_k`` classes by score (``.top1`` is the best)."""
        return await self._infer("classify", model, image, None, {"top_k": top_k}, timeout)

    @overload
    async def detect(self, model: str, image: ImageInput, score_threshold: float | None = None,
                     max_detections: int | None = None, *, timeout: TimeoutArg = _DEFAULT) -> DetectionResult: ...
    @overload
    async def detect(self, model: str, image: ImageBatch, score_threshold: float | None = None,
                     max_detections: int | None = None, *,
                     timeout: TimeoutArg = _DEFAULT) -> list[DetectionResult]: ...
    async def detect(self, model, image, score_threshold=None, max_detections=None, *, timeout=_DEFAULT):
        """Detect objects: boxes in input-image pixels, labels and scores."""
        options = {"score_threshold": score_threshold, "max_detections": max_detections}
        return await self._infer("detect", model, image, None, options, timeout)

    @overload
    async def restore(self, model: str, image: ImageInput, format: str = "png", *,
                      timeout: TimeoutArg = _DEFAULT) -> RestoredImage: ...
    @overload
    async def restore(self, model: str, image: ImageBatch, format: str = "png", *,
                      timeout: TimeoutArg = _DEFAULT) -> list[RestoredImage]: ...
    async def restore(self, model, image, format="png", *, timeout=_DEFAULT):
        """Super-resolve or denoise (``.image()`` is a PIL image, ``.array()`` numpy, ``.data`` the bytes)."""
        return await self._infer("restore", model, image, None, {"format": format}, timeout)

    @overload
    async def assess(self, model: str, image: ImageInput, reference: ImageInput | None = None, *,
                     timeout: TimeoutArg = _DEFAULT) -> AssessmentResult: ...
    @overload
    async def assess(self, model: str, image: ImageBatch, reference: ImageInput | ImageBatch | None = None, *,
                     timeout: TimeoutArg = _DEFAULT) -> list[AssessmentResult]: ...
    async def assess(self, model, image, reference=None, *, timeout=_DEFAULT):
        """Score image quality; full-reference models need ``reference`` (one for all, or one per image)."""
        return await self._infer("assess", model, image, reference, {}, timeout)

    @overload
    async def segment(self, model: str, image: ImageInput, format: str = "png", *,
                      timeout: TimeoutArg = _DEFAULT) -> SegmentationResult: ...
    @overload
    async def segment(self, model: str, image: ImageBatch, format: str = "png", *,
                      timeout: TimeoutArg = _DEFAULT) -> list[SegmentationResult]: ...
    async def segment(self, model, image, format="png", *, timeout=_DEFAULT):
        """Label every pixel: the classes present, and the mask (``.mask_array()``, ``.mask_png()``), which
        travels as a PNG (``format="png"``) or as each class's run lengths (``"rle"``)."""
        return await self._infer("segment", model, image, None, {"format": format}, timeout)

    # ------------------------------------------------------------ metadata and health

    async def models(self, *, timeout: TimeoutArg = _DEFAULT) -> list[ModelInfo]:
        """Every served model."""
        return cast(ModelList, await self._send(self._operation("models", timeout))).models

    async def model(self, name: str, *, timeout: TimeoutArg = _DEFAULT) -> ModelInfo:
        """One model's description; ModelNotFound if there is none."""
        return cast(ModelInfo, await self._send(self._operation("model", timeout, model=name)))

    async def health(self, *, timeout: TimeoutArg = _DEFAULT) -> Health:
        """Readiness with each model's status, whether or not all are ready."""
        return cast(Health, await self._send(self._operation("ready", timeout)))

    async def ready(self, *, timeout: TimeoutArg = _DEFAULT) -> bool:
        """True when every model is loaded and warmed up; False when not, or when unreachable."""
        return await self._probe("ready", timeout)

    async def live(self, *, timeout: TimeoutArg = _DEFAULT) -> bool:
        """True when the server answers its liveness probe; False when unreachable."""
        return await self._probe("live", timeout)

    # ------------------------------------------------------------ sending

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

    async def _infer(self, verb: str, model: str, image: Any, reference: Any, options: dict[str, Any],
                     timeout: TimeoutArg) -> Any:
        pairs = self._pairs(image, reference)
        if pairs is None:
            return await self._send(self._inference(verb, model, image, reference, options, timeout))
        gate = asyncio.Semaphore(self.max_in_flight)

        async def one(item: Any, item_reference: Any) -> Result:
            async with gate:
                return await self._send(self._inference(verb, model, item, item_reference, options, timeout))

        tasks = [asyncio.ensure_future(one(*pair)) for pair in pairs]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _probe(self, kind: OperationKind, timeout: TimeoutArg) -> bool:
        try:
            return cast(Health, await self.transport.handle(self._operation(kind, timeout))).status == "ok"
        except Unavailable:
            return False
