"""hybridserve-client: the Python SDK of hybridserve (HTTP and gRPC, sync and async).

    from hybridserve_client import Client

    with Client("http://localhost:8000") as client:
        print(client.classify("classifier", "digit.png").top1)

Light by design: pydantic, httpx, numpy and pillow; grpcio with the ``grpc`` extra. It never
imports torch or Ray.
"""

from hybridserve_client._base import USE_CLIENT_DEFAULT, BaseClient, Operation, RetryPolicy
from hybridserve_client.client import AsyncClient, Client
from hybridserve_client.exceptions import (
    ConnectionFailed,
    HybridServeError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    ServerError,
    Timeout,
    Unauthenticated,
    Unavailable,
    UnprocessableImage,
    UnsupportedMediaType,
    WrongTask,
)
from hybridserve_client.results import (
    AssessmentResult,
    ClassificationResult,
    ClassPrediction,
    Detection,
    DetectionResult,
    RestorationResult,
    RestoredImage,
    SegmentationResult,
    SegmentClass,
)
from hybridserve_client.schemas import Health, ModelInfo
from hybridserve_client.tasks import TASKS, TaskInfo

__version__ = "0.1.0"

__all__ = [
    "TASKS", "USE_CLIENT_DEFAULT", "AssessmentResult", "AsyncClient", "BaseClient", "ClassPrediction",
    "ClassificationResult", "Client", "ConnectionFailed", "Detection", "DetectionResult", "Health",
    "HybridServeError", "InvalidInput", "ModelInfo", "ModelNotFound", "ModelNotReady", "Operation", "Overloaded",
    "PayloadTooLarge", "RestorationResult", "RestoredImage", "RetryPolicy", "SegmentClass", "SegmentationResult",
    "ServerError", "TaskInfo", "Timeout", "Unauthenticated", "Unavailable", "UnprocessableImage",
    "UnsupportedMediaType", "WrongTask",
]
