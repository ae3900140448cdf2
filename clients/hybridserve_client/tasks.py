"""The task table: what the client knows about each task, declared once.

Each ``TaskInfo`` names the task (a spec's ``task:``), its verb (``POST
/v1/models/{name}/{verb}`` and the client method of that name), the result schema, the
request's option fields (HTTP query parameters, JSON fields and proto fields share these
names), whether it takes a reference image, and its RPC of the typed gRPC service
(``hybridserve.v1.HybridServe``) with that RPC's request message. The HTTP and gRPC
transports, both clients, the command line and ``schemas.Task``/``TASK_VERBS`` read it;
adding a task is one entry here, its result class in ``results.py`` and a method per client.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from hybridserve_client.results import (
    AssessmentResult,
    ClassificationResult,
    DetectionResult,
    RestorationResult,
    SegmentationResult,
)


@dataclass(frozen=True)
class TaskOption:
    """One option of a task's request: its name on every wire, its Python type, help and default.

    A default of None leaves the choice to the server (the default in the help text).
    """

    name: str
    type: type
    help: str
    choices: tuple[str, ...] | None = None
    default: str | None = None


@dataclass(frozen=True)
class TaskInfo:
    name: str
    verb: str
    summary: str  # what the verb does, for help texts
    result: type[BaseModel]  # the JSON result (restoration: the client returns it as a RestoredImage)
    options: tuple[TaskOption, ...]
    grpc_method: str  # the RPC of hybridserve.v1.HybridServe
    grpc_request: str  # its request message
    reference: bool = False  # takes a reference image (full-reference assessment)
    image_reply: bool = False  # the HTTP answer is the encoded image itself unless JSON is asked for
    output: str | None = None  # what the command line's -o writes, where the result has a picture


TASKS: tuple[TaskInfo, ...] = (
    TaskInfo("classification", "classify", "classify images", ClassificationResult,
             (TaskOption("top_k", int, "how many classes (server default 5)"),),
             "Classify", "ClassifyRequest"),
    TaskInfo("detection", "detect", "detect objects", DetectionResult,
             (TaskOption("score_threshold", float, "drop detections scoring below this (server default 0.3)"),
              TaskOption("max_detections", int, "keep at most this many (server default 100)")),
             "Detect", "DetectRequest", output="also write the image with its boxes drawn"),
    TaskInfo("restoration", "restore", "super-resolve or denoise", RestorationResult,
             (TaskOption("format", str, "encoding of the restored image", ("png", "jpeg", "webp"), "png"),),
             "Restore", "RestoreRequest", image_reply=True, output="where to write the restored image"),
    TaskInfo("iqa", "assess", "score image quality", AssessmentResult, (), "Assess", "AssessRequest",
             reference=True),
    TaskInfo("segmentation", "segment", "label every pixel", SegmentationResult,
             (TaskOption("format", str, "how the mask travels: a PNG label image, or each class's run lengths",
                         ("png", "rle"), "png"),),
             "Segment", "SegmentRequest", output="also write the mask (8-bit PNG, pixel value = class index)"),
)
BY_VERB: dict[str, TaskInfo] = {task.verb: task for task in TASKS}
# Every value of the ``format`` option, over the tasks that take one (each task accepts its own).
FORMATS: tuple[str, ...] = tuple(dict.fromkeys(
    choice for task in TASKS for option in task.options if option.name == "format" for choice in option.choices or ()))


def task_of(verb: str) -> TaskInfo:
    """The task served by ``verb``; ValueError for an unknown verb."""
    try:
        return BY_VERB[verb]
    except KeyError:
        raise ValueError(f"unknown verb {verb!r}: one of {', '.join(BY_VERB)}") from None
