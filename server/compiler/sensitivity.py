"""Which layers int8 hurts most: each layer's output SNR with it alone in int8, from one quantised graph.

``sensitivity`` ranks the conv and linear layers for the accuracy gate's mixed precision. It
measures, for every layer, the model in which only that layer runs int8 (its quantised input
and its int8 weight) and every other layer runs fp32, against the fp32 model. Instead of
annotating, calibrating and converting the model once per layer (minutes for a timm hybrid
with a hundred layers), it takes the one fully quantised graph and puts a switch in front of
each layer call: int8 input and weight, or the fp32 ones they came from. A measurement is
then one forward of the probe batches with one switch on. Quantise/dequantise steps that do
not feed a conv or linear (the inputs of a quantised add, say) stay as they are in every
measurement.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence

import torch
from torch import nn

from hybridserve.server.compiler.quantize import Batch, layer_name, output_snr


class _Switch(nn.Module):
    """Passes the int8 version of a layer's argument, or the fp32 one."""

    def __init__(self) -> None:
        super().__init__()
        self.int8 = True

    def forward(self, int8: torch.Tensor, fp32: torch.Tensor) -> torch.Tensor:
        return int8 if self.int8 else fp32


def _is(node: object, name: str) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and f".{name}." in f".{node.target}."


def _fp32_weights(graph: torch.fx.GraphModule) -> list[torch.Tensor | None]:
    """The fp32 weight of each conv/linear call of ``graph``, in graph order (``None`` where it is computed)."""
    weights = []
    for node in graph.graph.nodes:
        if layer_name(node) is not None:
            weight = node.args[1]
            is_attr = isinstance(weight, torch.fx.Node) and weight.op == "get_attr"
            weights.append(functools.reduce(getattr, weight.target.split("."), graph).detach() if is_attr else None)
    return weights


def switched(graph: torch.fx.GraphModule, quantized: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule,
                                                                                  dict[str, list[_Switch]]]:
    """A copy of ``quantized`` with a switch per conv/linear call, grouped by layer name (all on: int8)."""
    module = copy.deepcopy(quantized)
    weights = _fp32_weights(graph)
    calls = [node for node in module.graph.nodes if layer_name(node) is not None]
    if len(calls) != len(weights):  # conversion keeps every layer call: a mismatch is a bug, not a model
        raise RuntimeError(f"the quantised graph calls {len(calls)} layers, the fp32 graph {len(weights)}")
    switches: dict[str, list[_Switch]] = {}
    for index, (call, weight) in enumerate(zip(calls, weights)):
        switch = _Switch()
        module.add_submodule(f"_int8_switch{index}", switch)
        switches.setdefault(layer_name(call), []).append(switch)
        args = list(call.args)
        with module.graph.inserting_before(call):
            source = args[0]
            if _is(source, "dequantize_per_tensor") and _is(source.args[0], "quantize_per_tensor"):
                args[0] = module.graph.call_module(f"_int8_switch{index}", (source, source.args[0].args[0]))
            if weight is not None and _is(args[1], "dequantize_per_channel"):
                module.register_buffer(f"_fp32_weight{index}", weight)
                fp32 = module.graph.get_attr(f"_fp32_weight{index}")
                args[1] = module.graph.call_module(f"_int8_switch{index}", (args[1], fp32))
        call.args = tuple(args)
    module.recompile()
    return module, switches


def sensitivity(graph: torch.fx.GraphModule, quantized: torch.fx.GraphModule, layers: Sequence[str],
                probe: Sequence[Batch]) -> list[tuple[str, float]]:
    """Each layer with the output SNR (dB) of the model where it alone is int8; most sensitive first."""
    module, switches = switched(graph, quantized)
    with torch.no_grad():
        reference = [graph(*batch) for batch in probe]
        scores = []
        for layer in layers:
            for name, group in switches.items():
                for switch in group:
                    switch.int8 = name == layer
            scores.append((layer, output_snr(reference, [module(*batch) for batch in probe])))
    return sorted(scores, key=lambda pair: pair[1])
