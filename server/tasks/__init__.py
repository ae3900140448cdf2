"""The task registry: one module per task, each declaring its handler and its ``Task`` once.

Transports, the runtime, metadata and warm-up iterate over ``TASKS`` (name -> ``Task``);
``task_of`` finds one by name and ``task_for_verb`` by its HTTP verb. Adding a task is one
module here plus its result schema and proto messages in the client.
"""

from hybridserve.server.core.errors import WrongTask
from hybridserve.server.tasks import classification, detection, iqa, restoration, segmentation
from hybridserve.server.tasks.base import (
    Binary, InferenceRequest, Options, Prepared, Task, TaskHandler, TensorSpec,
)

TASKS: dict[str, Task] = {
    module.TASK.name: module.TASK for module in (classification, detection, restoration, iqa, segmentation)
}


def task_of(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}") from None


def task_for_verb(verb: str) -> Task:
    for task in TASKS.values():
        if task.verb == verb:
            return task
    raise WrongTask(f"no task answers /{verb}; the verbs are {', '.join(t.verb for t in TASKS.values())}")


__all__ = [
    "TASKS",
    "Binary",
    "InferenceRequest",
    "Options",
    "Prepared",
    "Task",
    "TaskHandler",
    "TensorSpec",
    "task_for_verb",
    "task_of",
]
