"""The CUDA path: every built-in task, fp16, the compiled backends and a served model on a GPU.

These tests run where a CUDA device exists (the GPU machine, a GPU CI runner) and skip by name
elsewhere; the CPU logic they rest on (handlers, compile fallback, batching) is tested on CPU
by the other files. Answers on the GPU are compared with the same model on the CPU.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from hybridserve_client.schemas import ClassificationResult

from hybridserve.server.compiler.runner import max_relative_error
from hybridserve.server.tasks import TASKS, InferenceRequest, Options
from hybridserve.server.tasks.restoration import Pixels
from hybridserve.server.engine.runtime import ModelRuntime
from hybridserve.server.core.spec import Compile, ModelSpec
from hybridserve.server.repository import builtin_repository, load_spec
from tests.conftest import LocalServer, needs_eval, write_spec
from tests.test_published_checkpoints import SET5, load_rgb, psnr_y

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BUILTIN_INPUTS = {
    "classifier": lambda rng: rng.integers(0, 256, (32, 32, 1), dtype=np.uint8),
    # A scene of shapes like those it was trained on: confident detections, not noise's near-ties.
    "detector": lambda rng: np.asarray(Image.open(EXAMPLES / "scene.png").convert("RGB")),
    "super-resolution-x2": lambda rng: rng.integers(0, 256, (40, 48, 3), dtype=np.uint8),
    "denoiser": lambda rng: rng.integers(0, 256, (48, 40, 3), dtype=np.uint8),
    "quality": lambda rng: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
}


def builtin(name: str, **compile_fields) -> ModelSpec:
    spec = load_spec(builtin_repository() / f"{name}.yaml")
    return spec.model_copy(update={"compile": Compile(**compile_fields)}) if compile_fields else spec


def loaded(spec: ModelSpec, device: str) -> ModelRuntime:
    runtime = ModelRuntime(spec, device)
    runtime.load()
    assert runtime.status == "ready", runtime.reason
    return runtime


def answer(runtime: ModelRuntime, image: np.ndarray):
    handler = runtime.handler
    prepared = handler.preprocess(InferenceRequest(image=image))
    with torch.inference_mode():
        output = handler.postprocess(prepared, handler.forward(prepared.items))
    # Restoration is compared pixel by pixel; the other tasks by their typed results.
    return output if isinstance(output, Pixels) else TASKS[runtime.spec.task].typed(runtime.spec, output, Options())


def outputs(runtime: ModelRuntime, image: np.ndarray):
    handler = runtime.handler
    reference = image if runtime.spec.needs_reference else None
    with torch.inference_mode():
        return handler.forward(handler.preprocess(InferenceRequest(image=image, reference=reference)).items)


# cuDNN convolutions use TF32 on Ampere and later by default, hence fp32's looser-than-CPU bound.
TOLERANCE = {"fp32": 5e-3, "fp16": 3e-2}


@pytest.mark.parametrize("name", sorted(BUILTIN_INPUTS))
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_builtin_models_answer_on_cuda_as_on_cpu(name, precision):
    image = BUILTIN_INPUTS[name](np.random.default_rng(0))
    cpu = loaded(builtin(name), "cpu")
    gpu = loaded(builtin(name, precision=precision), "cuda")
    assert next(gpu.handler.module.parameters()).is_cuda
    want, got = answer(cpu, image), answer(gpu, image)
    assert type(got) is type(want)
    if name == "detector":  # raw outputs list 100 candidates whose low-score tail may swap places
        assert got.labels == want.labels and len(want.labels) > 0
        assert np.abs(got.boxes - want.boxes).max() <= (1.0 if precision == "fp32" else 2.0)
        assert np.abs(got.scores - want.scores).max() <= TOLERANCE[precision]
    else:
        assert max_relative_error(outputs(cpu, image), outputs(gpu, image)) <= TOLERANCE[precision]
    if name == "classifier":
        assert got.top1.label == want.top1.label
    if isinstance(want, Pixels):  # restoration: the same image to within a few grey levels
        assert got.array.shape == want.array.shape
        assert np.abs(got.array.astype(int) - want.array.astype(int)).max() <= (2 if precision == "fp32" else 8)


@pytest.mark.parametrize("backend", ["inductor", "aot"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_compiled_backends_on_cuda_are_cached_and_match_eager(backend, precision, tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDSERVE_CACHE", str(tmp_path / "cache"))
    spec = builtin("classifier", backend=backend, precision=precision)
    first, second = loaded(spec, "cuda"), loaded(spec, "cuda")
    assert first.backend == second.backend == backend  # no fallback on a GPU
    assert (first.compiled.cache, second.compiled.cache) == ("miss", "hit")
    eager = loaded(builtin("classifier", precision=precision), "cuda")
    rng = np.random.default_rng(1)
    items = [eager.handler.preprocess(InferenceRequest(image=BUILTIN_INPUTS["classifier"](rng))).items[0]
             for _ in range(5)]
    with torch.inference_mode():
        want = eager.handler.forward(items)
        got = second.handler.forward(items)
    for a, b in zip(want, got):
        assert max_relative_error(a, b) <= (1e-3 if precision == "fp32" else 1e-2)


@pytest.mark.parametrize("precision,tolerance_db", [("fp32", 0.02), ("fp16", 0.05)])
def test_craft_x4_set5_on_cuda_keeps_the_published_quality(precision, tolerance_db, tmp_path):
    checkpoint = needs_eval("sr", "checkpoints", "craft_x4.pth")
    write_spec(tmp_path, "craft", task="restoration", architecture="spandrel", weights=str(checkpoint),
               preprocessing={"normalize": False, "tile": 192, "tile_overlap": 16},
               restoration={"kind": "super-resolution"}, compile={"precision": precision})
    runtime = loaded(load_spec(tmp_path / "craft.yaml"), "cuda")
    scores = []
    for name in SET5:
        lr = load_rgb(needs_eval("sr", "Set5", "LR_bicubic", "X4", f"{name}x4.png"))
        hr = load_rgb(needs_eval("sr", "Set5", "HR", f"{name}.png"))[: lr.shape[0] * 4, : lr.shape[1] * 4]
        scores.append(psnr_y(answer(runtime, lr).array, hr, 4))
    # 32.39 dB: this checkpoint served on the CPU, and through spandrel's own call (../shared/eval/README.md).
    assert float(np.mean(scores)) == pytest.approx(32.39, abs=tolerance_db), scores


def test_served_on_cuda_batches_and_reports_gpu_memory(tmp_path):
    """``hybridserve serve --no-ray --device cuda`` over HTTP: batched answers equal the CPU's."""
    spec_file = builtin_repository() / "classifier.yaml"
    data = yaml.safe_load(spec_file.read_text())
    data.update(weights=str(spec_file.parent / data["weights"]), device={"type": "cuda"},
                batching={"max_batch_size": 16, "max_wait_ms": 20}, compile={"backend": "eager"})
    (tmp_path / "classifier.yaml").write_text(yaml.safe_dump(data))
    cpu = loaded(builtin("classifier", backend="eager"), "cpu")
    rng = np.random.default_rng(2)
    images = [BUILTIN_INPUTS["classifier"](rng) for _ in range(16)]
    bodies = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0]).save(buffer, format="PNG")
        bodies.append(buffer.getvalue())

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/models/classifier/classify", content=body,
                                                      headers={"Content-Type": "image/png"}) for body in bodies))

    server = LocalServer(tmp_path).wait_live()
    try:
        responses = asyncio.run(burst(server.url))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        assert max(int(r.headers["X-Batch-Size"]) for r in responses) > 1
        for response, image in zip(responses, images):
            want = answer(cpu, image)
            assert ClassificationResult.model_validate(response.json()).top1.label == want.top1.label
        info = httpx.get(f"{server.url}/v1/models/classifier", timeout=30).json()
        assert info["device"].startswith("cuda")
        exposition = httpx.get(f"{server.url}/metrics", timeout=30).text
        allocated = [line for line in exposition.splitlines()
                     if line.startswith("hybridserve_gpu_memory_allocated_bytes{")]
        assert allocated and float(allocated[0].rsplit(" ", 1)[1]) > 0
    finally:
        server.stop()


def test_max_relative_error_sees_fp16_rounding_on_cuda():
    """The cross-check's own measure: an fp16 copy of a CUDA tensor differs, but within fp16's tolerance."""
    x = torch.randn(64, 64, device="cuda")
    error = max_relative_error(x, x.half().float())
    assert 0 < error <= 1e-2
