"""SegFormer and UperNet (ConvNeXt and Swin backbones) through ``transformers:<kind>``, built directly.

Each test spec in ``tests/specs/`` (``segformer-*.yaml``, ``upernet-*.yaml``: tiny configurations,
random weights, offline) is built with ``create_model`` from its architecture and architecture
args, and run on real photographs normalised as the server would. The segmentation contract:
logits ``(N, C, h, w)`` with ``(h, w)`` no larger than the input (here a quarter of it), finite,
and different for different images; UperNet's are those of transformers' own forward before it
upsamples them (hybridserve runs the decode head only). Weights saved from the model load back
both ways a user has: a state dict file through ``weights:`` (what ``hf-hub:<repo>/<file>``
resolves to), and a ``save_pretrained`` folder through ``architecture_args.pretrained`` (what a
hub id goes through).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import save_file
from skimage import data as photos

from hybridserve.models import create_model

SPECS = Path(__file__).resolve().parent / "specs"
SEGMENTATION_SPECS = sorted([*SPECS.glob("segformer-*.yaml"), *SPECS.glob("upernet-*.yaml")])
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def read(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def build(spec: dict, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    args = kwargs.pop("args", spec["architecture_args"])
    return create_model(spec["architecture"], args=args, **kwargs).module


def photo_batch(height: int, width: int) -> torch.Tensor:
    """The astronaut and the coffee cup, stretched to (height, width) and ImageNet-normalised."""
    images = [Image.fromarray(make()).resize((width, height), Image.BILINEAR)
              for make in (photos.astronaut, photos.coffee)]
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).float() / 255
    return (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def test_every_seed_family_has_a_spec() -> None:
    architectures = {read(path)["architecture"] for path in SEGMENTATION_SPECS}
    backbones = {read(path)["architecture_args"]["config"].get("backbone_config", {}).get("model_type")
                 for path in SEGMENTATION_SPECS}
    assert architectures == {"transformers:segformer", "transformers:upernet"}
    assert {"convnext", "swin"} <= backbones


@pytest.mark.parametrize("path", SEGMENTATION_SPECS, ids=lambda path: path.stem)
def test_logits_follow_the_segmentation_contract(path: Path) -> None:
    spec = read(path)
    assert spec["task"] == "segmentation"
    model = build(spec)
    height, width = spec["preprocessing"]["input_size"]
    with torch.no_grad():
        logits = model(photo_batch(height, width))
        wide = model(photo_batch(48, 80))
    assert isinstance(logits, torch.Tensor) and logits.dtype == torch.float32
    assert logits.shape == (2, len(spec["labels"]), height // 4, width // 4)
    assert wide.shape == (2, len(spec["labels"]), 12, 20)
    assert bool(torch.isfinite(logits).all()) and bool(torch.isfinite(wide).all())
    assert not torch.allclose(logits[0], logits[1]), "two different photographs gave the same logits"


@pytest.mark.parametrize("path", [path for path in SEGMENTATION_SPECS if path.stem.startswith("upernet")],
                         ids=lambda path: path.stem)
def test_upernet_logits_are_the_transformers_logits_before_their_upsampling(path: Path) -> None:
    from transformers import UperNetForSemanticSegmentation

    model = build(read(path))
    images = photo_batch(64, 64)
    with torch.no_grad():
        upsampled = F.interpolate(model(images), size=(64, 64), mode="bilinear", align_corners=False)
        torch.testing.assert_close(upsampled, UperNetForSemanticSegmentation.forward(model, pixel_values=images).logits)


@pytest.mark.parametrize("path", SEGMENTATION_SPECS, ids=lambda path: path.stem)
def test_saved_weights_load_back_as_a_file_and_as_a_pretrained_folder(path: Path, tmp_path: Path) -> None:
    spec = read(path)
    model = build(spec)
    images = photo_batch(*spec["preprocessing"]["input_size"])
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model.save_pretrained(tmp_path / "pretrained")
    from_file = build(spec, weights=str(tmp_path / "w.safetensors"))
    from_folder = build(spec, args={"pretrained": str(tmp_path / "pretrained")})
    with torch.no_grad():
        expected = model(images)
        torch.testing.assert_close(from_file(images), expected)
        torch.testing.assert_close(from_folder(images), expected)
