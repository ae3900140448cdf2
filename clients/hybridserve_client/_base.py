"""Everything the sync and async clients share and that does no I/O.

``BaseClient`` holds the configuration, turns method arguments into transport-neutral
``Operation`` objects (input conversion, options, auth and request-id headers) and owns the
retry policy. ``Client`` and ``AsyncClient`` add only the waiting: sending an operation through
a transport, sleeping between attempts, and running many images concurrently.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from pydantic import BaseModel

from hybridserve_client.exceptions import HybridServeError
from hybridserve_client.inputs import EncodedImage, ImageInput, encode_image, is_batch
from hybridserve_client.results import RestoredImage

OperationKind = Literal["infer", "models", "model", "live", "ready"]
WireProtocol = Literal["http", "grpc"]
DEFAULT_TIMEOUT_S = 30.0
Result = BaseModel | RestoredImage  # a wire schema, or a restored image


@dataclass(frozen=True)
class Operation:
    """One API call, independent of the wire: what a transport sends."""

    kind: OperationKind
    model: str | None = None
    verb: str | None = None
    image: EncodedImage | None = None
    reference: EncodedImage | None = None
    options: dict[str, Any] = field(default_factory=dict)  # only the options that were set
    headers: dict[str, str] = field(default_factory=dict)  # auth and X-Request-ID (HTTP headers / gRPC metadata)
    timeout: float | None = DEFAULT_TIMEOUT_S

    @property
    def request_id(self) -> str | None:
        return self.headers.get("X-Request-ID")


class Transport(Protocol):
    """Sends operations synchronously; raises ``HybridServeError`` subclasses on failure."""

    def handle(self, operation: Operation) -> Result: ...

    def close(self) -> None: ...


class AsyncTransport(Protocol):
    """The asynchronous counterpart of ``Transport``."""

    async def handle(self, operation: Operation) -> Result: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for retryable errors (``Unavailable`` and its subclasses).

    Attempt ``n`` (0-based) waits a random time in [b/2, b] with b = min(max_backoff, backoff * 2**n),
    and never less than the server's Retry-After.
    """

    retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 10.0

    def delay(self, attempt: int, error: HybridServeError) -> float | None:
        """Seconds to wait before retrying after ``error`` on ``attempt``, or None to give up."""
        if not error.retryable or attempt >= self.retries:
            return None
        ceiling = min(self.max_backoff, self.backoff * 2**attempt)
        return max(random.uniform(ceiling / 2, ceiling), error.retry_after or 0.0)


def protocol_of(url: str) -> WireProtocol:
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return "http"
    if scheme in ("grpc", "grpcs"):
        return "grpc"
    raise ValueError(f"cannot tell the protocol of {url!r}: use http://, https:// or grpc:// (or pass protocol=)")


class BaseClient:
    """Configuration, request building and retry policy; no I/O."""

    def __init__(self, url: str, *, api_key: str | None = None, token: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT_S, retries: int = 3, protocol: WireProtocol | None = None,
                 max_in_flight: int = 8, backoff: float = 0.5, max_backoff: float = 10.0):
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.url = url.rstrip("/")
        self.protocol: WireProtocol = protocol or protocol_of(url)
        self.timeout = timeout
        self.retry_policy = RetryPolicy(retries, backoff, max_backoff)
        self.max_in_flight = max_in_flight
        self._auth: dict[str, str] = {}
        if api_key:
            self._auth["X-API-Key"] = api_key
        if token:
            self._auth["Authorization"] = f"Bearer {token}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, protocol={self.protocol!r})"

    def _operation(self, kind: OperationKind, **fields: Any) -> Operation:
        headers = {**self._auth, "X-Request-ID": uuid.uuid4().hex}
        return Operation(kind, headers=headers, timeout=self.timeout, **fields)

    def _inference(self, verb: str, model: str, image: ImageInput, reference: ImageInput | None,
                   options: dict[str, Any]) -> Operation:
        return self._operation(
            "infer", model=model, verb=verb, image=encode_image(image),
            reference=None if reference is None else encode_image(reference),
            options={k: v for k, v in options.items() if v is not None})

    @staticmethod
    def _pairs(image: Any, reference: Any) -> list[tuple[Any, Any]] | None:
        """(image, reference) pairs when ``image`` is a batch, else None. One reference may serve all."""
        if not is_batch(image):
            if is_batch(reference):
                raise TypeError("a list of references needs a list of images")
            return None
        if is_batch(reference):
            if len(reference) != len(image):
                raise ValueError(f"{len(image)} images but {len(reference)} references")
            return list(zip(image, reference, strict=True))
        shared = None if reference is None else encode_image(reference)  # read and encoded once for all
        return [(item, shared) for item in image]

    # ------------------------------------------------------------ the API, shared by both clients
    # Each method returns what ``_infer``/``_call``/``_probe`` return: the result itself on ``Client``,
    # an awaitable of it on ``AsyncClient``. A list of images gives a list of results, in order.

    def classify(self, model: str, image: ImageInput | list[ImageInput], top_k: int | None = None) -> Any:
        """Classify one image (-> ClassificationResult) or a list of images (-> list of them)."""
        return self._infer("classify", model, image, None, {"top_k": top_k})

    def detect(self, model: str, image: ImageInput | list[ImageInput], score_threshold: float | None = None,
               max_detections: int | None = None) -> Any:
        """Detect objects (-> DetectionResult, boxes in input-image pixels)."""
        return self._infer("detect", model, image, None,
                           {"score_threshold": score_threshold, "max_detections": max_detections})

    def restore(self, model: str, image: ImageInput | list[ImageInput], format: str = "png") -> Any:
        """Super-resolve or denoise (-> RestoredImage; ``.image()`` is a PIL image, ``.array()`` numpy)."""
        return self._infer("restore", model, image, None, {"format": format})

    def assess(self, model: str, image: ImageInput | list[ImageInput],
               reference: ImageInput | list[ImageInput] | None = None) -> Any:
        """Score quality (-> AssessmentResult); full-reference models need ``reference``."""
        return self._infer("assess", model, image, reference, {})

    def models(self) -> Any:
        """Every served model (-> list of ModelInfo)."""
        return self._call(self._operation("models"), lambda listing: listing.models)

    def model(self, name: str) -> Any:
        """One model's description (-> ModelInfo); ModelNotFound if there is none."""
        return self._call(self._operation("model", model=name), lambda info: info)

    def health(self) -> Any:
        """Readiness with each model's status (-> Health), whether or not all are ready."""
        return self._call(self._operation("ready"), lambda health: health)

    def ready(self) -> Any:
        """True when every model is loaded and warmed up; False when not, or when unreachable."""
        return self._probe("ready")

    def live(self) -> Any:
        """True when the server answers its liveness probe; False when unreachable."""
        return self._probe("live")

    def _infer(self, verb: str, model: str, image: Any, reference: Any, options: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _call(self, operation: Operation, pick: Any) -> Any:
        raise NotImplementedError

    def _probe(self, kind: OperationKind) -> Any:
        raise NotImplementedError
