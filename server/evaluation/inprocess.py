"""``LocalPredictor``: the inference methods of ``hybridserve_client.Client`` over models in this process.

It loads the named models of a repository into a local data plane (the same runtimes,
handlers and batcher ``hybridserve serve --no-ray`` runs) and answers ``classify``,
``detect``, ``restore``, ``assess`` and ``model`` with the client's result types. A list of
images is submitted at once, so its items share batches; the server's errors become the
client's exception classes (same codes). This is the only module of
``hybridserve.server.evaluation`` that imports the server's internals.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hybridserve_client.exceptions import ERROR_CLASSES, ServerError
from hybridserve.server import HybridServeError, ModelSpec, builtin_repository, load_repository, load_spec, local_plane
from hybridserve_client.results import RestoredImage
from hybridserve.server.tasks import InferenceRequest, Options, task_for_verb


class LocalPredictor:
    """Models of ``repository`` (default: the built-in one) loaded here; use as a context manager."""

    def __init__(self, models: list[str], repository: str | Path | None = None, device: str | None = None,
                 timeout_s: float | None = None):
        repository = Path(repository) if repository else builtin_repository()
        self.repository = repository
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._plane = local_plane([_find_spec(repository, name) for name in models], device)
        for name in models:
            info = self.model(name)
            if info.status != "ready":
                raise RuntimeError(f"model {name!r} did not load: {info.reason}")

    def __enter__(self) -> LocalPredictor:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the batchers' tasks and close the event loop (the models go with this object)."""
        if self._loop.is_closed():
            return
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        if pending:  # gather() of nothing would look for a loop outside one
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def model(self, name: str) -> Any:
        """The model's ``ModelInfo``, as ``Client.model`` returns it."""
        return self._run(self._plane.model_info(name))

    def classify(self, model: str, image: Any, top_k: int | None = None) -> Any:
        return self._infer(model, "classify", image, None, Options(top_k=top_k))

    def detect(self, model: str, image: Any, score_threshold: float | None = None,
               max_detections: int | None = None) -> Any:
        return self._infer(model, "detect", image, None,
                           Options(score_threshold=score_threshold, max_detections=max_detections))

    def restore(self, model: str, image: Any, format: str = "png") -> Any:
        return self._infer(model, "restore", image, None, Options(format=format))

    def assess(self, model: str, image: Any, reference: Any = None) -> Any:
        return self._infer(model, "assess", image, reference, Options())

    def segment(self, model: str, image: Any) -> Any:
        return self._infer(model, "segment", image, None, Options())

    def _infer(self, model: str, verb: str, image: Any, reference: Any, options: Options) -> Any:
        if not isinstance(image, list):
            return self._run(self._one(model, verb, image, reference, options))
        references = reference if isinstance(reference, list) else [reference] * len(image)
        if len(references) != len(image):
            raise ValueError(f"{len(image)} images but {len(references)} references")

        async def every() -> list[Any]:
            return list(await asyncio.gather(*(self._one(model, verb, item, ref, options)
                                               for item, ref in zip(image, references))))

        return self._run(every())

    def _run(self, work: Any) -> Any:
        try:
            return self._loop.run_until_complete(work)
        except HybridServeError as error:
            raise ERROR_CLASSES.get(error.code, ServerError)(error.message, code=error.code) from error

    async def _one(self, model: str, verb: str, image: Any, reference: Any, options: Options) -> Any:
        request = InferenceRequest(_payload(image), None if reference is None else _payload(reference), options)
        output = (await self._plane.infer(model, verb, request, self.timeout_s)).result
        typed = task_for_verb(verb).typed(self._plane.endpoint(model).spec, output, options)
        return RestoredImage.from_schema(typed) if verb == "restore" else typed  # as the client returns it


def _find_spec(repository: Path, name: str) -> ModelSpec:
    """The spec named ``name``: ``<name>.yaml`` when it holds it (other specs are not read), else a search."""
    for path in (repository / f"{name}.yaml", repository / f"{name}.yml"):
        if path.is_file():
            spec = load_spec(path)
            if spec.name == name:
                return spec
    specs = {spec.name: spec for spec in load_repository(repository)}
    if name not in specs:
        raise LookupError(f"no model named {name!r} in {repository}; it has {', '.join(sorted(specs))}")
    return specs[name]


def _payload(image: Any) -> bytes | np.ndarray:
    """What the data plane takes: encoded bytes or a uint8 (H, W, C) array."""
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image)
    array = np.asarray(image)
    return np.ascontiguousarray(array[:, :, None] if array.ndim == 2 else array)
