"""Adapters from the zoo authors' released files to one strict state dict.

AHIQ's authors release the deformable fusion and the regressor of their model
(``{'deform_net_model_state_dict': ..., 'regressor_model_state_dict': ..., 'optimizer_state_dict': ...}``)
and build the ViT and ResNet-50 branches from timm's ImageNet weights. ``join_ahiq`` puts the four
parts under the names of ``zoo:ahiq``; the command writes them to one safetensors file:

    python -m hybridserve.models.zoo.checkpoints ahiq --release epoch33.pth \\
        --vit hf-hub:timm/vit_base_patch8_224.augreg_in21k_ft_in1k \\
        --cnn hf-hub:timm/resnet50.a1_in1k --out ahiq.safetensors

MANIQA's released checkpoints are plain state dicts already in ``zoo:maniqa``'s names: serve them as they are.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import torch

from hybridserve.models.weights import read_state_dict, resolve_weights

AHIQ_RELEASE_PARTS = {"deform_net": "deform_net_model_state_dict", "regressor": "regressor_model_state_dict"}


def prefixed(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{key}": value for key, value in state.items()}


def join_ahiq(
    release: Mapping[str, Mapping[str, torch.Tensor]],
    vit: Mapping[str, torch.Tensor],
    cnn: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """One state dict for ``zoo:ahiq`` from the authors' release and the two backbones' weights."""
    missing = [key for key in AHIQ_RELEASE_PARTS.values() if key not in release]
    if missing:
        raise ValueError(f"not an AHIQ release checkpoint: it lacks {', '.join(missing)}")
    state = {**prefixed("vit", vit), **prefixed("resnet50", cnn)}
    for prefix, key in AHIQ_RELEASE_PARTS.items():
        state.update(prefixed(prefix, release[key]))
    return {key: value.contiguous() for key, value in state.items()}


def read_release(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(prog="python -m hybridserve.models.zoo.checkpoints", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="model", required=True)
    ahiq = sub.add_parser("ahiq", help="join AHIQ's released parts and its backbones into one file")
    ahiq.add_argument("--release", required=True, help="the authors' checkpoint (.pth)")
    ahiq.add_argument("--vit", required=True, help="ViT weights: file or hf-hub:<repo>")
    ahiq.add_argument("--cnn", required=True, help="ResNet weights: file or hf-hub:<repo>")
    ahiq.add_argument("--out", required=True, type=Path, help="safetensors file to write")
    args = parser.parse_args(argv)
    state = join_ahiq(
        read_release(Path(args.release)),
        read_state_dict(resolve_weights(args.vit)),
        read_state_dict(resolve_weights(args.cnn)),
    )
    save_file(state, str(args.out))
    print(f"wrote {len(state)} tensors to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
