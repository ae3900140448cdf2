"""create_model: one way in from an architecture reference and weights to a servable module."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybridserve.models.builtin import ARCHITECTURES
from hybridserve.models.weights import WeightsMismatch, read_state_dict, resolve_weights


@dataclass
class LoadedModel:
    """A module ready for inference plus what serving needs to know about it."""

    module: nn.Module
    architecture: str
    scale: int = 1
    pad_multiple: int = 1
    in_channels: int = 3
    extra: dict[str, Any] = field(default_factory=dict)


def create_model(
    architecture: str,
    *,
    weights: str | None = None,
    weights_sha256: str | None = None,
    base_dir: Path | None = None,
    args: dict[str, Any] | None = None,
) -> LoadedModel:
    """Build the architecture, load its weights (if any) strictly, and put it in eval mode."""
    args = dict(args or {})
    state = None
    if weights:
        state = read_state_dict(resolve_weights(weights, base_dir, weights_sha256))
    kind, _, name = architecture.partition(":")
    if kind == "spandrel":
        loaded = _spandrel(state, architecture)
    else:
        module = _build(kind, name, args, base_dir, architecture)
        if state is not None:
            load_strict(module, state)
        loaded = LoadedModel(
            module=module,
            architecture=architecture,
            scale=int(getattr(module, "scale", 1)),
            pad_multiple=int(getattr(module, "pad_multiple", 1)),
            in_channels=int(getattr(module, "in_channels", args.get("in_chans", 3))),
        )
    loaded.module.eval().requires_grad_(False)
    return loaded


def _build(kind: str, name: str, args: dict, base_dir: Path | None, ref: str) -> nn.Module:
    if kind == "hybridserve":
        if name not in ARCHITECTURES:
            raise ValueError(f"unknown built-in architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
        module_name, _, attr = ARCHITECTURES[name].partition(":")
        factory = getattr(importlib.import_module(f"hybridserve.models.builtin.{module_name}"), attr)
        return factory(**args)
    if kind == "timm":
        import timm

        return timm.create_model(name, pretrained=False, **args)
    if kind == "transformers":
        from hybridserve.models.hf_transformers import build_transformers_model

        return build_transformers_model(name, **args)
    if kind == "zoo":
        from hybridserve.models.zoo import build_zoo_model

        return build_zoo_model(name, **args)
    if kind == "python":
        return _python_factory(name, base_dir)(**args)
    raise ValueError(
        f"architecture {ref!r}: expected hybridserve:<name>, timm:<name>, spandrel, "
        "transformers:<kind>, zoo:<name> or python:<module>:<factory>"
    )


def _python_factory(ref: str, base_dir: Path | None):
    module_ref, _, attr = ref.rpartition(":")
    if not module_ref or not attr:
        raise ValueError(f"python architecture {ref!r} must be <module or file.py>:<factory>")
    if module_ref.endswith(".py"):
        path = Path(module_ref)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise FileNotFoundError(f"python architecture file not found: {path}")
        mod_name = f"hybridserve_user_{path.stem}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_ref)
    factory = getattr(module, attr, None)
    if factory is None:
        raise ValueError(f"python architecture {ref!r}: {module.__name__} has no {attr!r}")
    return factory


def _spandrel(state: dict | None, ref: str) -> LoadedModel:
    if state is None:
        raise ValueError("architecture 'spandrel' detects the model from its weights: give `weights`")
    import spandrel

    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(state)
    except spandrel.UnsupportedModelError as exc:
        raise WeightsMismatch(f"spandrel does not recognise these weights: {exc}") from exc
    req = descriptor.size_requirements
    return LoadedModel(
        module=descriptor.model,
        architecture=f"spandrel:{descriptor.architecture.id}",
        scale=int(descriptor.scale),
        pad_multiple=max(int(req.multiple_of), 1),
        in_channels=int(descriptor.input_channels),
        extra={"min_size": int(req.minimum), "square": bool(req.square)},
    )


def load_strict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``module``; any missing, unexpected or mis-shaped key is an error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mis_shaped:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if mis_shaped:
            parts.append(f"shape mismatch: {show(mis_shaped)}")
        raise WeightsMismatch("weights do not fit the architecture; " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
