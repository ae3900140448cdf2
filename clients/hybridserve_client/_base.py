"""Everything the sync and async clients share and that does no I/O.

``BaseClient`` holds the configuration, turns method arguments into transport-neutral
``Operation`` objects (input conversion, options, auth and request-id headers, the timeout)
and owns the retry policy. ``Client`` and ``AsyncClient`` add only the waiting: sending an
operation through a transport, sleeping between attempts, and running many images
concurrently.

Every call takes ``timeout=``: seconds, ``None`` for no deadline, or (the default)
``USE_CLIENT_DEFAULT`` for the client's own setting, as httpx does.
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
from hybridserve_client.tasks import TaskInfo, task_of

OperationKind = Literal["infer", "models", "model", "live", "ready"]
WireProtocol = Literal["http", "grpc"]
DEFAULT_TIMEOUT_S = 30.0
Result = BaseModel | RestoredImage  # a wire schema, or a restored image


class UseClientDefault:
    """The type of ``USE_CLIENT_DEFAULT``: a per-call argument left to the client's setting."""

    def __repr__(self) -> str:
        return "USE_CLIENT_DEFAULT"


USE_CLIENT_DEFAULT = UseClientDefault()
TimeoutArg = float | None | UseClientDefault


def checked_timeout(timeout: float | None) -> float | None:
    """``timeout`` if it is None or a positive number of seconds; ValueError otherwise."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
    return timeout


@dataclass(frozen=True)
class Operation:
    """One API call, independent of the wire: what a transport sends."""

    kind: OperationKind
    model: str | None = None
    task: TaskInfo | None = None  # what an "infer" operation asks for
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
        self.timeout = checked_timeout(timeout)
        self.retry_policy = RetryPolicy(retries, backoff, max_backoff)
        self.max_in_flight = max_in_flight
        self._auth: dict[str, str] = {}
        if api_key:
            self._auth["X-API-Key"] = api_key
        if token:
            self._auth["Authorization"] = f"Bearer {token}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, protocol={self.protocol!r})"

    def _operation(self, kind: OperationKind, timeout: TimeoutArg = USE_CLIENT_DEFAULT, **fields: Any) -> Operation:
        headers = {**self._auth, "X-Request-ID": uuid.uuid4().hex}
        seconds = self.timeout if isinstance(timeout, UseClientDefault) else checked_timeout(timeout)
        return Operation(kind, headers=headers, timeout=seconds, **fields)

    def _inference(self, verb: str, model: str, image: ImageInput, reference: ImageInput | None,
                   options: dict[str, Any], timeout: TimeoutArg = USE_CLIENT_DEFAULT) -> Operation:
        return self._operation(
            "infer", timeout, model=model, task=task_of(verb), image=encode_image(image),
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
