"""int8 serving on CPU: PT2E quantisation, verified int8 kernels, the accuracy gate, its fallback and its cache.

Small real models, real calibration images on disk, real torch.compile builds (tens of
seconds each here), so one module-scoped compile cache is shared by the tests. The built-in
classifier and denoiser against their held-out sets are the slow tier.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from hybridserve.models import LoadedModel
from hybridserve.server.compiler.compile import compile_model
from hybridserve.server.compiler.kernels import MissingInt8Kernels, profiled_kernels, verify_int8
from hybridserve.server.compiler.quantize import export_graph, output_snr, quantizable_layers, quantize
from hybridserve.server.compiler.runner import example_batch, max_relative_error
from hybridserve.server.compiler.sensitivity import sensitivity
from hybridserve.server import builtin_repository, load_spec
from hybridserve.server.core.spec import AccuracyGate, Calibration, Compile, ModelSpec, Preprocessing
from hybridserve.server.engine.dataplane import describe
from hybridserve.server.engine.runtime import ModelRuntime
from hybridserve.server.observability import metrics, runtime_metrics
from hybridserve.server.tasks.classification import ClassificationHandler

torch.set_num_threads(1)
CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


class ConvNet(nn.Module):
    """Two convolutions and a linear head over 16x16 grayscale images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv2(F.relu(self.conv1(x)))).mean((2, 3)))


class OutlierNet(ConvNet):
    """One channel of conv1 is 10^4 times the others and conv2 ignores it: conv2's int8 input is all outlier.

    The pattern of a hybrid's bridge blocks (a few huge activation channels feeding the next
    layer): per-tensor uint8 on conv2's input has a step far above every other channel's
    values, so it rounds them all to zero and the int8 model outputs nothing (about 0 dB SNR).
    conv2 and the head have no bias, so every output is signal, not a constant the
    quantisation cannot touch. The gate fails until the sensitivity pass keeps conv2 (and
    only conv2) in fp32: conv2's input is then not quantised at all.
    """

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.conv2.weight[:, 0] = 0.0
            self.conv2.bias.zero_()
            self.head.bias.zero_()
        self.register_buffer("gain", torch.tensor([1e4] + [1.0] * 7).view(1, 8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv2(F.relu(self.conv1(x)) * self.gain)).mean((2, 3)))


class ScalarAddNet(ConvNet):
    """conv2's output plus a Python number right after it (FastViT's pattern, which torchao's annotator asserted on)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv2(F.relu(self.conv1(x))) + 0.5).mean((2, 3)))


class Elementwise(nn.Module):
    """Nothing int8 can run: no conv, no linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x.mean((1, 2, 3)), x.amax((1, 2, 3)), x.std((1, 2, 3)), x.amin((1, 2, 3))], 1)


def spec_for(model: str, images, backend: str = "inductor", **gate) -> ModelSpec:
    return ModelSpec(
        name=model.lower(), task="classification", architecture=f"python:tests.test_int8:{model}",
        preprocessing=Preprocessing(input_size=(16, 16), color="gray", mean=(0.5,), std=(0.5,)),
        labels=("a", "b", "c", "d"), batching={"max_batch_size": 4},
        compile=Compile(backend=backend, precision="int8", calibration=Calibration(images=str(images), count=24),
                        accuracy_gate=AccuracyGate(**{"metric": "snr", "min_value": 20.0, "count": 24, **gate})),
    )


def handler_for(model: type[nn.Module], spec: ModelSpec) -> ClassificationHandler:
    torch.manual_seed(0)
    module = model().eval().requires_grad_(False)
    return ClassificationHandler(spec, LoadedModel(module, spec.architecture), CPU)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Smooth random grayscale pictures (blurred noise), 16x16 PNGs."""
    folder = tmp_path_factory.mktemp("calibration")
    rng = np.random.default_rng(0)
    for index in range(32):
        noise = torch.from_numpy(rng.random((1, 1, 8, 8), dtype=np.float32))
        picture = F.interpolate(noise, size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
        Image.fromarray((picture.numpy() * 255).astype(np.uint8), mode="L").save(folder / f"{index:02d}.png")
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HYBRIDSERVE_CACHE", str(folder))
        yield folder / "compiled"


WARM_LOAD = """
import json, sys, torch
from tests.test_int8 import CPU, ConvNet, handler_for, spec_for
from hybridserve.server.compiler.compile import compile_model
from hybridserve.server.compiler.kernels import profiled_kernels
from hybridserve.server.compiler.runner import example_batch

torch.set_num_threads(1)
spec = spec_for("ConvNet", sys.argv[1])
result = compile_model(handler_for(ConvNet, spec), spec.compile, CPU)
batch = example_batch(result.example, 3, CPU, torch.float32)
with torch.inference_mode():
    output = result.module(*batch)
print(json.dumps({"cache": result.cache, "precision": result.precision, "artifact": str(result.artifact),
                  "gate": result.gate, "kernels": sum(profiled_kernels(result.module, batch).values()),
                  "output": output.tolist()}))
"""


def warm_load(images) -> dict:
    """``compile_model`` of ConvNet's int8 spec in a new Python process (the module's cache, by its env)."""
    done = subprocess.run([sys.executable, "-c", WARM_LOAD, str(images)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_spec_fields_and_their_checks():
    config = Compile(backend="inductor", precision="int8")
    assert config.calibration.count == 64 and config.calibration.activations == "histogram"
    assert config.accuracy_gate.metric == "auto"
    with pytest.raises(ValueError, match="int8 needs a compiled backend"):
        Compile(precision="int8")
    with pytest.raises(ValueError):
        Calibration(activations="mean")
    with pytest.raises(ValueError):
        AccuracyGate(max_drop=-1)


def test_int8_passes_its_gate_runs_int8_kernels_and_a_second_load_reuses_the_cache(images, cache):
    spec = spec_for("ConvNet", images)
    handler = handler_for(ConvNet, spec)
    cold = compile_model(handler, spec.compile, CPU)
    assert cold.precision == "int8" and cold.backend == "inductor" and cold.cache == "miss"
    assert cold.fp32_layers == () and cold.gate["passed"] and cold.gate["metric"] == "snr"
    assert cold.gate["value"] >= 20.0 and "dB SNR" in cold.gate["reason"]
    batch = example_batch(cold.example, 3, CPU, torch.float32)
    kinds = profiled_kernels(cold.module, batch)
    assert kinds.get("qconv_pointwise") and kinds.get("qlinear_pointwise")  # convs and head ran in int8
    meta = json.loads((cold.artifact / "meta.json").read_text())
    assert meta["int8"]["calibration"] and meta["int8"]["torchao"] and meta["kernels"]["quantized_layers"] == 3
    with torch.inference_mode():
        cold_out = cold.module(*batch)

    warm = warm_load(images)  # a fresh process, as a restarted server: nothing quantised is imported yet
    assert warm["cache"] == "hit" and warm["precision"] == "int8" and warm["artifact"] == str(cold.artifact)
    assert warm["gate"] == cold.gate and warm["kernels"] == sum(kinds.values())
    assert max_relative_error(cold_out, torch.tensor(warm["output"])) <= 1e-3
    assert sorted(p.name for p in cache.iterdir()) == [cold.artifact.name]

    other = spec.model_copy(update={"compile": spec.compile.model_copy(
        update={"calibration": Calibration(images=str(images), count=20)})})
    assert compile_model(handler_for(ConvNet, other), other.compile, CPU).cache == "miss"  # calibration set in the key


def test_the_sensitivity_pass_keeps_the_layer_that_breaks_the_gate_in_fp32(images, cache):
    spec = spec_for("OutlierNet", images)
    handler = handler_for(OutlierNet, spec)
    graph = export_graph(handler.module, example_batch(torch.rand(1, 16, 16), 2, CPU, torch.float32), 4)
    layers = quantizable_layers(graph)
    assert layers == ["conv1", "conv2", "head"]
    probe = [example_batch(torch.rand(1, 16, 16) * 2 - 1, 4, CPU, torch.float32)]
    ranked = dict(sensitivity(graph, quantize(graph, probe, Calibration()), layers, probe))
    assert list(ranked) == sorted(ranked, key=ranked.get) and next(iter(ranked)) == "conv2"
    assert ranked["conv2"] < 10 < 20 < min(ranked["conv1"], ranked["head"])  # conv2 alone in int8 breaks the model

    result = compile_model(handler, spec.compile, CPU)
    assert result.precision == "int8" and result.fp32_layers == ("conv2",)
    assert result.gate["passed"] and result.gate["simulated"]["passed"]
    meta = json.loads((result.artifact / "meta.json").read_text())
    assert meta["fp32_layers"] == ["conv2"] and meta["kernels"]["programs"]["4"].get("qlinear_pointwise") == 1


def test_a_build_that_fails_its_gate_serves_fp32_with_the_reason_and_the_verdict_is_cached(images, cache, caplog):
    spec = spec_for("OutlierNet", images, max_fp32_layers=0).model_copy(update={"name": "never"})
    with caplog.at_level(logging.WARNING, logger="hybridserve.compile"):
        result = compile_model(handler_for(OutlierNet, spec), spec.compile, CPU)
    assert result.precision == "fp32" and result.backend == "inductor" and not result.gate["passed"]
    assert "dB SNR against fp32 < 20" in result.precision_reason
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "int8 not served" in warnings[0]
    failed = [p for p in cache.iterdir() if not json.loads((p / "meta.json").read_text()).get("gate", {"passed": 1})["passed"]]
    assert len(failed) == 1
    built = (failed[0] / "meta.json").stat().st_mtime_ns
    again = compile_model(handler_for(OutlierNet, spec), spec.compile, CPU)
    assert again.precision == "fp32" and again.precision_reason == result.precision_reason
    assert (failed[0] / "meta.json").stat().st_mtime_ns == built  # the verdict was read, not measured again


def test_the_aot_backend_builds_int8_packages_that_call_int8_kernels_and_match_the_quantised_graph(images, cache):
    spec = spec_for("ConvNet", images, backend="aot").model_copy(update={"name": "convnet-aot"})
    result = compile_model(handler_for(ConvNet, spec), spec.compile, CPU)
    assert result.precision == "int8" and result.backend == "aot", result.precision_reason
    meta = json.loads((result.artifact / "meta.json").read_text())
    assert sorted(meta["files"]) == ["1", "2", "4"]  # static buckets: AOTInductor's dynamic int8 program drifts
    programs = meta["kernels"]["programs"]  # read from the packages' generated C++
    assert all(kinds.get("qconv_pointwise") == 2 for kinds in programs.values())
    assert programs["2"].get("qlinear_pointwise") == programs["4"].get("qlinear_pointwise") == 1
    assert meta["kernels"]["kernels"] == min(sum(kinds.values()) for kinds in programs.values())  # the fewest, reported
    assert abs(result.gate["value"] - result.gate["simulated"]["value"]) < 3.0  # the package computes what was gated


def test_a_conv_followed_by_adding_a_number_is_quantised_on_its_own():
    torch.manual_seed(0)
    examples = lambda size: (torch.rand(size, 1, 16, 16) * 2 - 1,)  # noqa: E731
    graph = export_graph(ScalarAddNet().eval(), examples(2), 4)
    quantized = quantize(graph, [examples(4)], Calibration())
    per_channel = torch.ops.quantized_decomposed.dequantize_per_channel.default
    assert sum(node.target == per_channel for node in quantized.graph.nodes) == 3  # both convs and the head
    batch = examples(4)
    assert output_snr([graph(*batch)], [quantized(*batch)]) > 20


def test_a_compiled_quantised_graph_without_int8_kernels_is_a_failed_build(images):
    """The AOTInductor trap (pytorch/ao#4566): compiled without freezing, the q/dq graph runs fp32 kernels."""
    handler = handler_for(ConvNet, spec_for("ConvNet", images))
    examples = lambda size: example_batch(torch.rand(1, 16, 16), size, CPU, torch.float32)  # noqa: E731
    graph = export_graph(handler.module, examples(2), 4)
    quantized = quantize(graph, [examples(4)], Calibration())
    with torch._inductor.config.patch(freezing=False), torch.inference_mode():
        unfused = torch.compile(quantized, dynamic=False)
        unfused(*examples(2))
        with pytest.raises(MissingInt8Kernels, match="calls no int8 kernel"):
            verify_int8("inductor", {2: unfused}, {}, None, examples, 3)


def test_a_model_with_nothing_to_quantise_serves_fp32_with_the_reason(images, cache):
    spec = spec_for("Elementwise", images).model_copy(update={"name": "elementwise"})
    handler = ClassificationHandler(spec, LoadedModel(Elementwise(), spec.architecture), CPU)
    result = compile_model(handler, spec.compile, CPU)
    assert result.precision == "fp32" and "no conv or linear layer" in result.precision_reason


def test_the_runtime_reports_the_precision_in_use_the_reason_and_the_fallback_metric(images, cache, tmp_path):
    gauge = lambda name: metrics.backend().registry.get_sample_value(  # noqa: E731  (this process's registry)
        "hybridserve_model_int8_fallback", {"model": name})
    served = ModelRuntime(spec_for("ConvNet", images), observer=runtime_metrics)
    served.load()
    info = describe(served.spec, served.state())
    assert served.status == "ready", served.reason
    assert info.precision == "int8" and "SNR" in info.precision_reason and info.fp32_layers == []
    assert gauge("convnet") == 0.0
    missing = ModelRuntime(spec_for("ConvNet", tmp_path / "absent").model_copy(update={"name": "absent"}),
                           observer=runtime_metrics)
    missing.load()
    info = describe(missing.spec, missing.state())
    assert missing.status == "ready" and info.precision == "fp32" and "does not exist" in info.precision_reason
    assert gauge("absent") == 1.0


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a few minutes each alone; far longer on a shared, busy machine
@pytest.mark.parametrize("name", ["classifier", "denoiser"])
def test_builtin_models_keep_their_heldout_quality_in_int8(name, cache):
    spec = load_spec(builtin_repository() / f"{name}.yaml")
    spec = spec.model_copy(update={"compile": Compile(backend="inductor", precision="int8",
                                                      calibration=Calibration(images="builtin", count=64))})
    runtime = ModelRuntime(spec)
    runtime.load()
    assert runtime.status == "ready", runtime.reason
    gate = runtime.compiled.gate
    assert runtime.compiled.precision == "int8", runtime.compiled.precision_reason
    assert gate["metric"] == ("heldout:top1" if name == "classifier" else "heldout:psnr")
    assert gate["reference"] - gate["value"] <= (0.5 if name == "classifier" else 0.1)
