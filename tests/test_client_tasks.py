"""The client's task table agrees with everything built from it or beside it: both clients'
methods (names, parameters, return types), the typed gRPC service's RPCs and messages, the
schemas' ``Task``/``TASK_VERBS`` and the command line. No server: these read the code itself.
"""

from __future__ import annotations

import inspect
import io
import typing

import numpy as np
import pytest
from PIL import Image

from hybridserve_client import USE_CLIENT_DEFAULT, AsyncClient, Client, RestoredImage
from hybridserve_client._grpc.hybridserve.v1 import hybridserve_pb2 as pb
from hybridserve_client.cli import build_parser
from hybridserve_client.schemas import TASK_VERBS, ModelInfo, SegmentationResult, SegmentClass, Task
from hybridserve_client.tasks import TASKS, TaskInfo, task_of

SERVICE = pb.DESCRIPTOR.services_by_name["HybridServe"]
IDS = [task.verb for task in TASKS]


def test_the_table_names_every_task_once():
    assert len({task.name for task in TASKS}) == len({task.verb for task in TASKS}) == len(TASKS) == 5
    assert typing.get_args(Task) == tuple(task.name for task in TASKS)
    assert TASK_VERBS == {task.name: task.verb for task in TASKS}
    assert ModelInfo.model_json_schema()["properties"]["task"]["enum"] == [task.name for task in TASKS]
    assert task_of("segment").name == "segmentation"
    with pytest.raises(ValueError, match="unknown verb 'paint'"):
        task_of("paint")


@pytest.mark.parametrize("client_class", [Client, AsyncClient])
@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_each_client_spells_out_the_method_of_each_task(client_class, task: TaskInfo):
    method = getattr(client_class, task.verb)
    assert inspect.iscoroutinefunction(method) is (client_class is AsyncClient)
    parameters = inspect.signature(method).parameters
    expected = ["self", "model", "image", *(option.name for option in task.options)]
    expected += ["reference"] if task.reference else []
    assert list(parameters) == [*expected, "timeout"]
    assert parameters["timeout"].kind is inspect.Parameter.KEYWORD_ONLY
    assert parameters["timeout"].default is USE_CLIENT_DEFAULT
    for option in task.options:
        assert parameters[option.name].default == option.default
    single, batch = typing.get_overloads(method)
    returned = RestoredImage if task.image_reply else task.result
    assert returns(single) is returned
    assert returns(batch) == list[returned]


def returns(function) -> object:
    """The return annotation of ``function``, evaluated where it is defined (its module uses postponed annotations)."""
    return eval(function.__annotations__["return"], function.__globals__)


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_each_task_has_its_rpc_and_messages(task: TaskInfo):
    rpc = SERVICE.methods_by_name[task.grpc_method]
    assert rpc.input_type.name == task.grpc_request
    request_fields = set(rpc.input_type.fields_by_name)
    assert request_fields == {"model", "image", *(o.name for o in task.options), *(["reference"] * task.reference)}
    # The reply mirrors the JSON result field by field: that is what lets json_format map one onto the other.
    assert rpc.output_type.name == task.result.__name__
    assert set(rpc.output_type.fields_by_name) <= set(task.result.model_fields)
    required = {name for name, field in task.result.model_fields.items() if field.is_required()}
    assert required <= set(rpc.output_type.fields_by_name)


def test_segmentation_messages_match_the_schema():
    classes = pb.SegmentClass.DESCRIPTOR.fields_by_name
    assert [(f.name, f.number) for f in pb.SegmentClass.DESCRIPTOR.fields] == [
        ("index", 1), ("label", 2), ("pixels", 3), ("fraction", 4), ("rle", 5)]
    assert classes["pixels"].type == classes["rle"].type == classes["pixels"].TYPE_INT64
    assert [f.name for f in pb.SegmentClass.DESCRIPTOR.fields] == list(SegmentClass.model_fields)
    result = pb.SegmentationResult.DESCRIPTOR
    assert [(f.name, f.number) for f in result.fields] == [
        ("model", 1), ("width", 2), ("height", 3), ("labels", 4), ("classes", 5), ("mask", 6), ("mask_format", 7)]
    assert result.fields_by_name["mask"].type == result.fields_by_name["mask"].TYPE_BYTES
    assert pb.SegmentRequest.DESCRIPTOR.fields_by_name["format"].has_presence


def test_run_lengths_decode_to_the_mask():
    """format=rle: each class's COCO-style runs (column-major, starting outside) rebuild the mask exactly."""
    rng = np.random.default_rng(3)
    mask = rng.integers(0, 3, (5, 7), dtype=np.uint8)
    mask[0, 0] = 2  # a class whose first run (outside) is empty
    classes = []
    for index in np.unique(mask):
        inside = (mask == index).ravel(order="F")
        runs, value, length = [], False, 0
        for pixel in inside:
            if pixel != value:
                runs.append(length)
                value, length = pixel, 0
            length += 1
        runs.append(length)
        classes.append(SegmentClass(index=int(index), label=str(index), pixels=int(inside.sum()),
                                    fraction=float(inside.mean()), rle=runs))
    result = SegmentationResult(model="m", width=7, height=5, labels=["0", "1", "2"], classes=classes,
                                mask_format="rle")
    assert classes[-1].rle[0] == 0 and result.mask is None
    assert np.array_equal(result.mask_array(), mask)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(result.mask_png()))), mask)


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_the_command_line_has_a_command_per_task(task: TaskInfo):
    parser = build_parser()
    argv = [task.verb, "http://localhost:8000", "some-model", "a.png", "b.png"]
    for option in task.options:
        argv += [f"--{option.name.replace('_', '-')}", (option.choices or ("3",))[-1]]
    if task.reference:
        argv += ["--reference", "ref.png"]
    if task.image_reply:
        argv += ["-o", "out.png"]
    args = parser.parse_args(argv)
    assert (args.command, args.model, args.images) == (task.verb, "some-model", ["a.png", "b.png"])
    for option in task.options:
        assert getattr(args, option.name) == option.type((option.choices or ("3",))[-1])
