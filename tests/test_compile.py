"""Compile backends on CPU with tiny models: eager cross-check, fallback, artifact cache, bucket padding.

Compiling costs tens of seconds even for a tiny net here, so one module-scoped cache folder is
shared: the aot artifact built by one test is what the tensorrt-fallback test reuses. The
built-in classifier through the whole runtime is the slow tier.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybridserve.models import LoadedModel
from hybridserve.server.compiler.aot import GilFreeAOTProgram, probe_package
from hybridserve.server.compiler.artifacts import artifact_key
from hybridserve.server.compiler.compile import compile_model
from hybridserve.server.compiler.runner import (
    BatchRunner, CompileMismatch, check_against_eager, default_buckets, example_batch, max_relative_error,
)
from hybridserve.server.tasks.classification import ClassificationHandler
from hybridserve.server.core.spec import Batching, Compile, ModelSpec, Preprocessing
from hybridserve.server.repository import builtin_repository, load_spec

torch.set_num_threads(1)
CPU = torch.device("cpu")
MAX_BATCH = 4


class TinyNet(nn.Module):
    """A conv + norm + linear classifier of 8x8 grayscale images (fast to compile)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.norm(self.conv(x))).mean((2, 3)))


class TwoHeads(TinyNet):
    """Two outputs (logits and pooled features), as detection models have."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = F.gelu(self.norm(self.conv(x))).mean((2, 3))
        return self.head(features), features


class FixedBatch(TinyNet):
    """Loops over the batch in Python, so tracing fixes the batch size (dynamic-batch compiles fail)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([super(FixedBatch, self).forward(x[i:i + 1]) for i in range(x.shape[0])])


class DriftsWhenCompiled(TinyNet):
    """Deliberately wrong once compiled: adds 0.5 to the logits only inside a compiled graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out + 0.5 if torch.compiler.is_compiling() else out


class BatchRecorder(nn.Module):
    """Records the batch sizes it sees; returns a tuple output that depends on each item alone."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def forward(self, image: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.sizes.append(image.shape[0])
        return image.sum((1, 2, 3)) * 2, other.flatten(1) - 1


def tiny_spec(backend: str, model: type[nn.Module] = TinyNet, **compile_args) -> ModelSpec:
    return ModelSpec(
        name="tiny", task="classification", architecture=f"python:tests.test_compile:{model.__name__}",
        preprocessing=Preprocessing(input_size=(8, 8), color="gray", mean=(0.5,), std=(0.5,)),
        labels=("a", "b", "c"), batching=Batching(max_batch_size=MAX_BATCH),
        compile=Compile(backend=backend, **compile_args),
    )


def tiny_handler(backend: str, model: type[TinyNet] = TinyNet, **compile_args) -> ClassificationHandler:
    torch.manual_seed(0)
    module = model().eval().requires_grad_(False)
    with torch.no_grad():  # non-trivial running statistics, so a wrong fold would show
        module.norm.running_mean.uniform_(-0.5, 0.5)
        module.norm.running_var.uniform_(0.5, 2.0)
    spec = tiny_spec(backend, model, **compile_args)
    return ClassificationHandler(spec, LoadedModel(module, spec.architecture), CPU)


def assert_matches_eager(handler, served, sizes) -> None:
    item = torch.rand(1, 8, 8)
    for size in sizes:
        batch = example_batch(item, size, CPU, torch.float32)
        with torch.inference_mode():
            assert max_relative_error(handler.loaded.module(*batch), served(*batch)) <= 1e-3, size


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("compile-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HYBRIDSERVE_CACHE", str(folder))
        yield folder / "compiled"


def test_eager_serves_the_module_itself(compile_cache):
    handler = tiny_handler("eager")
    result = compile_model(handler, handler.spec.compile, CPU)
    assert result.backend == "eager" and result.module is handler.module and result.cache is None
    assert result.warmup_sizes == () and not compile_cache.exists()


def test_aot_dynamic_batch_matches_eager_and_a_second_load_reuses_the_artifact(compile_cache):
    handler = tiny_handler("aot", model=TwoHeads)
    cold = compile_model(handler, handler.spec.compile, CPU)
    assert cold.backend == "aot" and cold.cache == "miss"
    assert cold.module.dynamic and cold.warmup_sizes == (1, 2, MAX_BATCH)
    package = cold.artifact / "dynamic.pt2"
    assert package.is_file() and (cold.artifact / "meta.json").is_file()
    assert_matches_eager(handler, cold.module, range(1, 2 * MAX_BATCH + 2))  # above max: split into chunks
    assert isinstance(cold.module.programs[None], GilFreeAOTProgram)  # the GIL is free while it computes
    built = package.stat().st_mtime_ns

    again = tiny_handler("aot", model=TwoHeads)
    warm = compile_model(again, again.spec.compile, CPU)
    assert warm.backend == "aot" and warm.cache == "hit" and warm.artifact == cold.artifact
    assert package.stat().st_mtime_ns == built  # loaded, not rebuilt
    assert sorted(p.name for p in compile_cache.iterdir()) == [cold.artifact.name]
    assert_matches_eager(again, warm.module, (1, 3))


def test_tensorrt_without_cuda_falls_back_with_one_warning(compile_cache, caplog):
    handler = tiny_handler("tensorrt", model=TwoHeads)
    with caplog.at_level(logging.WARNING, logger="hybridserve.compile"):
        result = compile_model(handler, handler.spec.compile, CPU)
    assert result.backend == "aot"
    warnings = [r for r in caplog.records if r.name == "hybridserve.compile" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "tensorrt" in warnings[0].getMessage() and "CUDA" in warnings[0].getMessage()
    assert_matches_eager(handler, result.module, (1, 2))


def test_inductor_matches_eager_and_keeps_its_kernels(compile_cache):
    handler = tiny_handler("inductor")
    cold = compile_model(handler, handler.spec.compile, CPU)
    assert cold.backend == "inductor" and cold.cache == "miss" and cold.module.dynamic
    assert (cold.artifact / "inductor.bin").stat().st_size > 0
    assert_matches_eager(handler, cold.module, range(1, MAX_BATCH + 1))
    again = tiny_handler("inductor")
    assert compile_model(again, again.spec.compile, CPU).cache == "hit"


def test_a_model_that_fixes_its_batch_gets_static_buckets(compile_cache):
    handler = tiny_handler("inductor", model=FixedBatch)
    result = compile_model(handler, handler.spec.compile, CPU)
    assert result.backend == "inductor" and not result.module.dynamic
    assert result.warmup_sizes == default_buckets(MAX_BATCH) == (1, 2, 4)
    assert_matches_eager(handler, result.module, range(1, 2 * MAX_BATCH + 1))


def test_a_compiled_module_that_differs_from_eager_fails_the_load(compile_cache):
    handler = tiny_handler("inductor", model=DriftsWhenCompiled)
    before = set(compile_cache.iterdir()) if compile_cache.exists() else set()
    with pytest.raises(CompileMismatch, match="max relative error"):
        compile_model(handler, handler.spec.compile, CPU)
    assert set(compile_cache.iterdir()) == before  # a wrong artifact is never cached


def test_the_cross_check_tolerance_follows_the_precision():
    model = TinyNet().eval()
    batch = (torch.rand(2, 1, 8, 8),)
    reference = model(*batch)

    def off_by(fraction):
        return lambda x: model(x) + fraction * reference.abs().max()

    assert check_against_eager(model, off_by(5e-4), [batch], "fp32", "tiny") <= 1e-3
    with pytest.raises(CompileMismatch):
        check_against_eager(model, off_by(5e-3), [batch], "fp32", "tiny")
    assert check_against_eager(model, off_by(5e-3), [batch], "fp16", "tiny") <= 1e-2
    assert max_relative_error(reference, reference[:1]) == float("inf")


def test_bucket_padding_runs_only_bucket_sizes_and_drops_the_padding():
    recorder = BatchRecorder()
    buckets = default_buckets(6)
    assert buckets == (1, 2, 4, 6)
    runner = BatchRunner({size: recorder for size in buckets}, recorder, ((3, 4, 4), (2, 5)), max_batch=6)
    assert runner.warmup_sizes == buckets
    for count in range(1, 14):
        image, other = torch.rand(count, 3, 4, 4), torch.rand(count, 2, 5)
        recorder.sizes.clear()
        sums, flat = runner(image, other)
        assert recorder.sizes and set(recorder.sizes) <= set(buckets)
        assert torch.allclose(sums, image.sum((1, 2, 3)) * 2) and torch.equal(flat, other.flatten(1) - 1)
    recorder.sizes.clear()
    runner(torch.rand(3, 3, 8, 8), torch.rand(3, 2, 5))  # not the compiled item shape: eager, unpadded
    assert recorder.sizes == [3]


def test_the_artifact_key_follows_weights_shapes_and_precision():
    handler = tiny_handler("aot")
    module = handler.loaded.module
    shapes = {"items": ((1, 8, 8),), "max_batch": 4, "buckets": None}
    key, fields = artifact_key(handler, module, "aot", shapes, "fp32")
    assert fields["torch"] == torch.__version__ and fields["device"].startswith("cpu:")
    assert artifact_key(handler, module, "aot", shapes, "fp32")[0] == key
    assert artifact_key(handler, module, "inductor", shapes, "fp32")[0] != key
    assert artifact_key(handler, module, "aot", {**shapes, "buckets": (1, 4)}, "fp32")[0] != key
    assert artifact_key(handler, module, "aot", shapes, "fp16")[0] != key
    with torch.no_grad():
        module.head.bias.add_(1e-3)
    assert artifact_key(handler, module, "aot", shapes, "fp32")[0] != key


def test_fp16_on_cpu_serves_fp32():
    handler = tiny_handler("eager", precision="fp16")
    result = compile_model(handler, handler.spec.compile, CPU)
    assert handler.dtype == torch.float32 and result.backend == "eager"


@pytest.mark.slow
def test_static_buckets_on_aot(compile_cache):
    handler = tiny_handler("aot", batch_buckets=(1, 2, 4))
    result = compile_model(handler, handler.spec.compile, CPU)
    assert result.backend == "aot" and not result.module.dynamic and result.warmup_sizes == (1, 2, 4)
    assert sorted(p.name for p in result.artifact.glob("*.pt2")) == ["b1.pt2", "b2.pt2", "b4.pt2"]
    assert_matches_eager(handler, result.module, range(1, 7))


@pytest.mark.slow
def test_builtin_classifier_through_the_runtime_on_aot(compile_cache):
    from hybridserve.server.tasks import InferenceRequest
    from hybridserve.server.engine.runtime import ModelRuntime

    spec = load_spec(builtin_repository() / "classifier.yaml")  # its spec asks for aot
    eager = ModelRuntime(spec.model_copy(update={"compile": Compile(backend="eager")}))
    eager.load()
    compiled_spec = spec.model_copy(update={"compile": Compile(backend="aot")})
    loads = []
    for _ in range(2):
        runtime = ModelRuntime(compiled_spec)
        runtime.load()
        assert runtime.status == "ready", runtime.reason
        loads.append(runtime)
    assert [r.compiled.cache for r in loads] == ["miss", "hit"] and loads[1].backend == "aot"
    digit = (torch.rand(32, 32, 1) * 255).to(torch.uint8).numpy()
    items = [loads[1].handler.preprocess(InferenceRequest(image=digit)).items[0]] * 3
    for got, want in zip(loads[1].handler.forward(items), eager.handler.forward(items)):
        assert max_relative_error(want, got) <= 1e-3


@pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("torch_tensorrt")),
                    reason="needs CUDA and torch-tensorrt")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_on_cuda(compile_cache, precision):
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    module = TinyNet().eval().requires_grad_(False).to(cuda)
    spec = tiny_spec("tensorrt", precision=precision)
    handler = ClassificationHandler(spec, LoadedModel(module, spec.architecture), cuda)
    result = compile_model(handler, spec.compile, cuda)
    assert result.backend == "tensorrt" and result.cache == "miss" and result.module.dynamic
    item = torch.rand(1, 8, 8)
    for size in (1, 3, MAX_BATCH):
        batch = example_batch(item, size, cuda, handler.dtype)
        with torch.inference_mode():
            error = max_relative_error(handler.module(*batch), result.module(*batch))
        assert error <= (1e-3 if precision == "fp32" else 1e-2)


def test_a_package_that_cannot_load_fails_its_probe_in_a_child_process(tmp_path):
    """The probe that keeps a crashing AOTInductor loader out of the server reports a failed child."""
    broken = tmp_path / "broken.pt2"
    broken.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(RuntimeError, match=r"broken.pt2: loading it in a child process failed \(exit status 1\)"):
        probe_package(broken, (torch.rand(2, 1, 8, 8),))
