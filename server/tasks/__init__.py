"""One handler per task; ``handler_for(task)`` picks it."""

from hybridserve.server.tasks.base import InferenceRequest, Options, Prepared, TaskHandler
from hybridserve.server.tasks.classification import ClassificationHandler
from hybridserve.server.tasks.detection import DetectionHandler
from hybridserve.server.tasks.iqa import IQAHandler
from hybridserve.server.tasks.restoration import RestorationHandler, RestoredImage

HANDLERS: dict[str, type[TaskHandler]] = {
    "classification": ClassificationHandler,
    "detection": DetectionHandler,
    "restoration": RestorationHandler,
    "iqa": IQAHandler,
}


def handler_for(task: str) -> type[TaskHandler]:
    return HANDLERS[task]


__all__ = [
    "HANDLERS",
    "ClassificationHandler",
    "DetectionHandler",
    "IQAHandler",
    "InferenceRequest",
    "Options",
    "Prepared",
    "RestorationHandler",
    "RestoredImage",
    "TaskHandler",
    "handler_for",
]
