"""Post-training int8 quantisation with torchao's PT2E flow for x86 CPUs (oneDNN kernels through Inductor).

The model is exported with a dynamic batch, annotated by ``X86InductorQuantizer`` (weights
int8 per output channel, symmetric; activations uint8 per tensor with a range from a
histogram search, min/max or a percentile), calibrated on representative items, and
converted to a graph of quantise/dequantise pairs around each conv and linear layer, which
Inductor's freezing passes fuse into oneDNN int8 kernels. ``fp32_layers`` names layers the
annotator leaves alone (mixed precision; ``sensitivity`` says which).
Without VNNI (AVX2-only CPUs) activations use 7 bits, as the quantizer's authors advise.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybridserve.server.compiler.runner import output_leaves
from hybridserve.server.core.spec import Calibration

Batch = tuple[torch.Tensor, ...]
LAYER_OPS = ("aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.linear", "aten.conv_transpose2d")


@functools.cache
def has_vnni() -> bool:
    """Whether the CPU multiplies uint8 by int8 without saturating 16-bit sums (AVX512-VNNI, AVX-VNNI, AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _observer(calibration: Calibration) -> Any:
    from torchao.quantization.pt2e.observer import HistogramObserver, MinMaxObserver

    class PercentileObserver(HistogramObserver):
        """The activation range between two percentiles of the observed histogram (clips rare outliers)."""

        def calculate_qparams(self):
            total = float(self.histogram.sum())
            if total == 0 or not math.isfinite(float(self.max_val - self.min_val)):
                return super().calculate_qparams()
            cdf = torch.cumsum(self.histogram, 0) / total
            edges = torch.linspace(float(self.min_val), float(self.max_val), self.bins + 1)
            tail = (100.0 - calibration.percentile) / 100.0
            low = edges[int(torch.searchsorted(cdf, torch.tensor(tail)))]
            high = edges[min(self.bins, int(torch.searchsorted(cdf, torch.tensor(1.0 - tail))) + 1)]
            return self._calculate_qparams(torch.minimum(low, torch.zeros(())), torch.maximum(high, torch.zeros(())))

    return {"histogram": HistogramObserver, "minmax": MinMaxObserver,
            "percentile": PercentileObserver}[calibration.activations]


def register_quantized_ops() -> None:
    """Register what compiling a saved quantised graph needs: its ``quantized_decomposed`` ops, and the
    Inductor passes that fuse them into oneDNN int8 kernels (torchao registers those on importing its
    x86 quantizer). Quantising imports both; a process that only loads a cached graph must ask for them,
    or its program runs fp32 between quantise steps (``kernels`` then fails the build)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401


def quantization_config(calibration: Calibration) -> Any:
    """X86InductorQuantizer's static config with the spec's activation observer."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        get_default_x86_inductor_quantization_config,
    )

    config = get_default_x86_inductor_quantization_config(reduce_range=not has_vnni())
    activation = dataclasses.replace(config.input_activation,
                                     observer_or_fake_quant_ctr=_observer(calibration).with_args(eps=2**-12))
    return dataclasses.replace(config, input_activation=activation, output_activation=activation)


def export_graph(module: nn.Module, example: Batch, max_batch: int) -> torch.fx.GraphModule:
    """The module as an ATen graph with a dynamic batch dimension, ready for the annotator."""
    dim = torch.export.Dim("batch", min=1, max=max_batch)
    dynamic = tuple({0: dim} for _ in example)
    return torch.export.export(module, example, dynamic_shapes=dynamic, strict=False).module()


def layer_name(node: torch.fx.Node) -> str | None:
    """The module name of a conv or linear call (``None`` for any other node, or one without a module)."""
    if node.op != "call_function" or not str(node.target).startswith(LAYER_OPS):
        return None
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    return list(stack.values())[-1][0].removeprefix("L['self'].") or None


def quantizable_layers(graph: torch.fx.GraphModule) -> list[str]:
    """Names of the conv and linear modules the graph calls, in graph order (the layers int8 can take)."""
    names: list[str] = []
    for node in graph.graph.nodes:
        name = layer_name(node)
        if name and name not in names:
            names.append(name)
    return names


@functools.cache
def _quantizer_class() -> type:
    """torchao's ``X86InductorQuantizer``, leaving a conv followed by ``+ scalar`` unfused instead of failing.

    torchao asserts that the other input of an add after a conv is a tensor (FastViT adds a
    Python number there); such a conv is then quantised on its own, as any conv."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    class Quantizer(X86InductorQuantizer):
        def _get_input_idx_for_binary_node(self, conv_gemm_node, binary_node):
            args = binary_node.args
            if any(args[i] is conv_gemm_node and not isinstance(args[1 - i], torch.fx.Node) for i in (0, 1)):
                return None, None  # the annotator's own answer for "no fusion here"
            return super()._get_input_idx_for_binary_node(conv_gemm_node, binary_node)

    return Quantizer


def quantize(graph: torch.fx.GraphModule, batches: Iterable[Batch], calibration: Calibration,
             fp32_layers: Sequence[str] = ()) -> torch.fx.GraphModule:
    """Annotate, calibrate on ``batches`` and convert; ``fp32_layers`` stay fp32."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = _quantizer_class()().set_global(quantization_config(calibration))
    for name in fp32_layers:
        quantizer.set_module_name_qconfig(name, None)
    prepared = prepare_pt2e(copy.deepcopy(graph), quantizer)
    with torch.no_grad():
        for batch in batches:
            prepared(*batch)
    return convert_pt2e(prepared)


def output_snr(reference: Sequence[Any], candidate: Sequence[Any]) -> float:
    """Signal-to-noise ratio in dB of ``candidate`` outputs against ``reference`` (all leaves together)."""
    signal = noise = 0.0
    for ref, got in zip(reference, candidate):
        for a, b in zip(output_leaves(ref), output_leaves(got)):
            if a.is_floating_point():
                a, b = a.detach().double(), b.detach().double()
                signal += float((a * a).sum())
                noise += float(((a - b) ** 2).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-30) / noise)
