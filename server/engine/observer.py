"""What the model runtime reports, and to whom: the engine names the events, observability records them.

A ``RuntimeObserver`` is handed to ``ModelRuntime`` by whoever builds it (the serve command, the
Ray deployments); ``hybridserve.server.observability.runtime_metrics`` is the one that records
Prometheus metrics and spans. ``NULL_OBSERVER`` records nothing (libraries, tests, ``eval``).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol


class RuntimeObserver(Protocol):
    def load_stage(self, model: str, stage: str) -> AbstractContextManager[None]: ...

    def model_loaded(self, runtime: Any) -> None: ...

    def queued_items(self, model: str, count: int) -> None: ...

    def items_cancelled(self, model: str, count: int) -> None: ...

    def batch_done(self, model: str, queue_waits: Sequence[float], compute_s: float, device: Any) -> None: ...

    def inference_done(self, model: str, items: Sequence[Any], timings: dict[str, float]) -> None: ...


class NullObserver:
    """Records nothing."""

    def load_stage(self, model: str, stage: str) -> AbstractContextManager[None]:
        return nullcontext()

    def model_loaded(self, runtime: Any) -> None:
        pass

    def queued_items(self, model: str, count: int) -> None:
        pass

    def items_cancelled(self, model: str, count: int) -> None:
        pass

    def batch_done(self, model: str, queue_waits: Sequence[float], compute_s: float, device: Any) -> None:
        pass

    def inference_done(self, model: str, items: Sequence[Any], timings: dict[str, float]) -> None:
        pass


NULL_OBSERVER = NullObserver()
