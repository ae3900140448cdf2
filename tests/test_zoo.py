"""The seed papers' architectures, each served from a spec through the HTTP API.

Every architecture is built in its smallest variant with random weights (``pretrained=False``,
offline), its weights are written to a file (safetensors, or a ``.pth`` holding
``{'params': {'module.' + key: ...}}``), and one ``hybridserve serve --no-ray`` process serves all
of them. Tests check the shape and type of each answer; restoration and IQA answers are also
compared with calling the same module directly. CPU cost on 2 loaded cores: building and writing
the weights takes about a minute, loading and warming up every model in the server a minute or two.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file, load_file
from skimage import data as photos
from spandrel.architectures.CRAFT import CRAFT
from spandrel.architectures.DAT import DAT
from spandrel.architectures.DnCNN import DnCNN
from spandrel.architectures.DRCT import DRCT
from spandrel.architectures.HAT import HAT
from spandrel.architectures.Swin2SR import Swin2SR
from spandrel.architectures.SwinIR import SwinIR

from hybridserve.models import WeightsMismatch, create_model
from hybridserve.models.factory import load_strict
from hybridserve.models.hf_transformers import build_transformers_model
from hybridserve.models.zoo import build_zoo_model
from hybridserve.models.zoo.checkpoints import join_ahiq, main as checkpoints_main, read_release
from hybridserve_client.schemas import AssessmentResult, ClassificationResult, DetectionResult
from tests.conftest import LocalServer, write_spec

torch.set_num_threads(1)

LABELS = ["cat", "dog", "bird", "fish"]
BATCHING = {"max_batch_size": 2, "max_wait_ms": 1}
# Weights written as {'params': {'module.' + key: tensor}} .pth files; the others as safetensors.
SAVED_AS_PTH = {"swin", "levit", "rt-detr-nextvit", "hat", "maniqa"}

TIMM_CLASSIFIERS = {  # spec name: (timm model, input side)
    "coatnet": ("coatnet_nano_rw_224", 224),
    "maxvit": ("maxvit_nano_rw_256", 256),  # its windows do not divide 224
    "nextvit": ("nextvit_small", 224),
    "swin": ("swin_tiny_patch4_window7_224", 224),
    "convnext": ("convnext_atto", 224),
    "poolformer": ("poolformer_s12", 224),
    "crossvit": ("crossvit_tiny_240", 240),
    "tnt": ("tnt_s_patch16_224", 224),
    "fastvit": ("fastvit_t8", 256),
    "mobilevit": ("mobilevitv2_050", 256),
    "efficientformer": ("efficientformerv2_s0", 224),
    "levit": ("levit_128s", 224),
}

TINY_DETR = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64, decoder_ffn_dim=64,
                 encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10, num_labels=len(LABELS))
TINY_RT_DETR = dict(TINY_DETR, encoder_hidden_dim=32, decoder_in_channels=[32, 32, 32])
del TINY_RT_DETR["encoder_layers"]
RESNET_LIKE = {"model_type": "rt_detr_resnet", "depths": [1, 1, 1, 1], "hidden_sizes": [32, 64, 128, 256],
               "embedding_size": 32, "layer_type": "basic", "out_indices": [2, 3, 4]}
NEXTVIT = {"model_type": "timm_backbone", "backbone": "nextvit_small", "out_indices": [1, 2, 3]}
TRANSFORMERS_MODELS = {  # spec name: (task, kind, config, input side)
    # transformers indexes CvT's drop-path rates by stage number: stage i needs at least i + 1 blocks.
    "cvt": ("classification", "cvt",
            dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], num_labels=len(LABELS)), 64),
    "detr": ("detection", "detr", dict(TINY_DETR, backbone="resnet18"), 128),
    "rt-detr": ("detection", "rt_detr", dict(TINY_RT_DETR, backbone_config=RESNET_LIKE,
                                             encoder_in_channels=[64, 128, 256]), 128),
    "rt-detr-nextvit": ("detection", "rt_detr", dict(TINY_RT_DETR, backbone_config=NEXTVIT,
                                                     encoder_in_channels=[256, 512, 1024]), 128),
}
SERVED_FROM_PRETRAINED_FOLDER = {"rt-detr"}  # `pretrained: <save_pretrained folder>` instead of `weights:`

RESTORERS = {  # spec name: (module, scale, channels); the smallest configurations spandrel still detects
    "hat": (lambda: HAT(embed_dim=12, depths=[1], num_heads=[2], window_size=4, squeeze_factor=4, mlp_ratio=2,
                        upscale=2, num_feat=16), 2, 3),
    "drct": (lambda: DRCT(embed_dim=12, depths=[1], num_heads=[2], window_size=4, mlp_ratio=2, upscale=2,
                          upsampler="pixelshuffle", gc=8), 2, 3),
    "swinir": (lambda: SwinIR(embed_dim=12, depths=[1], num_heads=[2], window_size=4, mlp_ratio=2, upscale=2,
                              upsampler="pixelshuffledirect"), 2, 3),
    "swin2sr": (lambda: Swin2SR(embed_dim=12, depths=[1], num_heads=[2], window_size=4, mlp_ratio=2, upscale=2,
                                upsampler="pixelshuffledirect"), 2, 3),
    # Under 32 channels, DAT's and CRAFT's position-bias layers would have no weights at all.
    "dat": (lambda: DAT(embed_dim=32, split_size=[2, 4], depth=[1], num_heads=[2], expansion_factor=2, upscale=2), 2, 3),
    # spandrel cannot read CRAFT's window size from the weights and assumes the published 16.
    "craft": (lambda: CRAFT(embed_dim=32, depths=[1], num_heads=[2], window_size=16, split_size_0=4, split_size_1=16,
                            mlp_ratio=2, upscale=2), 2, 3),
    "dncnn": (lambda: DnCNN(in_nc=1, out_nc=1, nc=16, nb=8, act_mode="R"), 1, 1),  # 8 blocks: spandrel's minimum
}

TINY_AHIQ = dict(vit="vit_tiny_patch16_224", cnn="resnet18", cnn_blocks=2, deform_hidden=32, regressor_width=32)
TINY_MANIQA = dict(vit="vit_tiny_patch16_224", embed_dim=48, dim_mlp=48, num_heads=[2, 2], window_size=7, crops=5)


@dataclass
class Zoo:
    url: str
    direct: dict[str, torch.nn.Module] = field(default_factory=dict)


def save_weights(module: torch.nn.Module, stem: Path, as_pth: bool) -> str:
    state = {key: value.contiguous() for key, value in module.state_dict().items()}
    if as_pth:
        path = stem.with_suffix(".pth")
        torch.save({"params": {f"module.{key}": value for key, value in state.items()}}, path)
    else:
        path = stem.with_suffix(".safetensors")
        save_file(state, str(path))
    return str(path)


def write_classifiers(repo: Path, weights: Path) -> None:
    for name, (model_name, side) in TIMM_CLASSIFIERS.items():
        torch.manual_seed(0)
        model = timm.create_model(model_name, pretrained=False, num_classes=len(LABELS))
        write_spec(repo, name, task="classification", architecture=f"timm:{model_name}",
                   architecture_args={"num_classes": len(LABELS)},
                   weights=save_weights(model, weights / name, name in SAVED_AS_PTH),
                   preprocessing={"input_size": [side, side]}, labels=LABELS, batching=BATCHING)


def write_transformers_models(repo: Path, weights: Path) -> None:
    for name, (task, kind, config, side) in TRANSFORMERS_MODELS.items():
        torch.manual_seed(0)
        model = build_transformers_model(kind, config=config)
        args: dict = {"config": config}
        spec: dict = {}
        if name in SERVED_FROM_PRETRAINED_FOLDER:
            model.save_pretrained(weights / name)
            args = {"pretrained": str(weights / name)}
        else:
            spec["weights"] = save_weights(model, weights / name, name in SAVED_AS_PTH)
        # RT-DETR takes pixels in [0, 1]; CvT and DETR ImageNet-normalised ones.
        preprocessing = {"input_size": [side, side], "normalize": kind != "rt_detr"}
        write_spec(repo, name, task=task, architecture=f"transformers:{kind}", architecture_args=args,
                   preprocessing=preprocessing, labels=LABELS, batching=BATCHING, **spec)


def write_restorers(repo: Path, weights: Path, direct: dict) -> None:
    for name, (make, scale, channels) in RESTORERS.items():
        torch.manual_seed(0)
        model = make().eval()
        direct[name] = model
        color = {"color": "rgb"} if channels == 3 else {"color": "gray", "mean": [0.0], "std": [1.0]}
        write_spec(repo, name, task="restoration", architecture="spandrel",
                   weights=save_weights(model, weights / name, name in SAVED_AS_PTH),
                   preprocessing={"normalize": False, "tile": 64, "tile_overlap": 16, **color},
                   restoration={"kind": "super-resolution" if scale > 1 else "denoising"}, batching=BATCHING)


def write_iqa_models(repo: Path, weights: Path, direct: dict) -> None:
    torch.manual_seed(0)
    direct["ahiq"] = build_zoo_model("ahiq", **TINY_AHIQ).eval()
    write_spec(repo, "ahiq", task="iqa", architecture="zoo:ahiq", architecture_args=TINY_AHIQ,
               weights=save_weights(direct["ahiq"], weights / "ahiq", False),
               preprocessing={"normalize": False}, iqa={"kind": "full-reference", "range": [0, 1]}, batching=BATCHING)
    direct["maniqa"] = build_zoo_model("maniqa", **TINY_MANIQA).eval()
    write_spec(repo, "maniqa", task="iqa", architecture="zoo:maniqa", architecture_args=TINY_MANIQA,
               weights=save_weights(direct["maniqa"], weights / "maniqa", True),
               preprocessing={"mean": [0.5] * 3, "std": [0.5] * 3},
               iqa={"kind": "no-reference", "range": [0, 1]}, batching=BATCHING)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    repo, weights = tmp_path_factory.mktemp("zoo"), tmp_path_factory.mktemp("zoo-weights")
    found = Zoo(url="")
    write_classifiers(repo, weights)
    write_transformers_models(repo, weights)
    write_restorers(repo, weights, found.direct)
    write_iqa_models(repo, weights, found.direct)
    # Weights of one architecture under another: the load must fail and say which keys.
    write_spec(repo, "mismatch", task="classification", architecture="timm:convnext_atto",
               architecture_args={"num_classes": len(LABELS)}, weights=str(weights / "levit.pth"),
               preprocessing={"input_size": [224, 224]})
    quiet = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore"}
    server = LocalServer(repo, env=quiet).wait_live(timeout=900)
    found.url = server.url
    yield found
    server.stop()


def photo(height: int, width: int, gray: bool = False) -> np.ndarray:
    """A crop of a real photograph (scikit-image's astronaut)."""
    image = photos.astronaut()[100:100 + height, 150:150 + width]
    if gray:
        image = np.asarray(Image.fromarray(image).convert("L"))[:, :, None]
    return np.array(image)  # a writable copy


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def to_batch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255.0


def post(zoo: Zoo, name: str, verb: str, image: np.ndarray, **params) -> httpx.Response:
    response = httpx.post(f"{zoo.url}/v1/models/{name}/{verb}", content=png(image), params=params,
                          headers={"Content-Type": "image/png"}, timeout=300)
    assert response.status_code == 200, response.text
    return response


@pytest.mark.parametrize("name", [*TIMM_CLASSIFIERS, "cvt"])
def test_classifier_serves_softmax_over_its_labels(zoo, name):
    result = ClassificationResult.model_validate_json(post(zoo, name, "classify", photo(200, 180)).text)
    assert len(result.predictions) == len(LABELS)
    assert {p.label for p in result.predictions} == set(LABELS)
    scores = [p.score for p in result.predictions]
    assert scores == sorted(scores, reverse=True)
    assert math.isclose(sum(scores), 1.0, abs_tol=1e-3)


@pytest.mark.parametrize("name", [n for n, (task, *_) in TRANSFORMERS_MODELS.items() if task == "detection"])
def test_detector_serves_boxes_inside_the_image(zoo, name):
    image = photo(150, 200)
    response = post(zoo, name, "detect", image, score_threshold=0.0, max_detections=5)
    result = DetectionResult.model_validate_json(response.text)
    assert (result.width, result.height) == (200, 150)
    assert 1 <= len(result.detections) <= 5
    for detection in result.detections:
        x1, y1, x2, y2 = detection.box
        assert 0 <= x1 < x2 <= 200 and 0 <= y1 < y2 <= 150
        assert detection.label == LABELS[detection.index]
    scores = [d.score for d in result.detections]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("name", RESTORERS)
def test_restorer_detected_by_spandrel_serves_what_the_module_computes(zoo, name):
    _, scale, channels = RESTORERS[name]
    image = photo(32, 48, gray=channels == 1)  # sides that need no padding for any of them
    response = post(zoo, name, "restore", image)
    served = np.asarray(Image.open(io.BytesIO(response.content)))
    assert served.shape[:2] == (32 * scale, 48 * scale)
    assert (int(response.headers["X-Image-Width"]), int(response.headers["X-Image-Height"])) == (48 * scale, 32 * scale)
    with torch.inference_mode():
        expected = zoo.direct[name](to_batch(image))[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    difference = np.abs(served.reshape(expected.shape).astype(int) - expected.astype(int))
    assert difference.max() <= 1


def test_ahiq_full_reference_scores_the_pair_as_the_module_does(zoo):
    reference = photo(64, 80)  # upscaled until a 224-pixel crop fits
    noise = np.random.default_rng(0).normal(0, 20, reference.shape)
    distorted = np.clip(reference + noise, 0, 255).astype(np.uint8)
    response = httpx.post(f"{zoo.url}/v1/models/ahiq/assess", timeout=300,
                          files={"image": png(distorted), "reference": png(reference)})
    assert response.status_code == 200, response.text
    result = AssessmentResult.model_validate_json(response.text)
    assert result.kind == "full-reference" and math.isfinite(result.score)
    with torch.inference_mode():
        expected = zoo.direct["ahiq"](to_batch(reference), to_batch(distorted))
    assert expected.shape == (1,)
    assert result.score == pytest.approx(float(expected[0]), rel=1e-3, abs=1e-5)


def test_maniqa_no_reference_scores_the_image_as_the_module_does(zoo):
    image = photo(230, 260)  # scored on its centre and corner crops of 224 pixels
    result = AssessmentResult.model_validate_json(post(zoo, "maniqa", "assess", image).text)
    assert result.kind == "no-reference" and math.isfinite(result.score)
    with torch.inference_mode():
        expected = zoo.direct["maniqa"]((to_batch(image) - 0.5) / 0.5)
    assert expected.shape == (1,)
    assert result.score == pytest.approx(float(expected[0]), rel=1e-3, abs=1e-5)


def test_weights_of_another_architecture_fail_the_load_naming_the_keys(zoo):
    info = httpx.get(f"{zoo.url}/v1/models/mismatch", timeout=30).json()
    assert info["status"] == "failed"
    assert "missing keys: " in info["reason"] and "unexpected keys: " in info["reason"]
    assert "head.fc.weight" in info["reason"]  # ConvNeXt's, absent from the LeViT weights
    assert "head.linear.weight" in info["reason"]  # LeViT's, unknown to ConvNeXt


def test_pretrained_folder_missing_a_weight_is_refused(tmp_path):
    config = TRANSFORMERS_MODELS["cvt"][2]
    build_transformers_model("cvt", config=config).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsMismatch, match="missing keys"):
        build_transformers_model("cvt", pretrained=str(tmp_path))


def test_ahiq_release_parts_join_into_one_strict_checkpoint(tmp_path):
    torch.manual_seed(1)
    released = build_zoo_model("ahiq", **TINY_AHIQ).eval()
    release_file = tmp_path / "epoch33.pth"
    torch.save({"deform_net_model_state_dict": released.deform_net.state_dict(),
                "regressor_model_state_dict": released.regressor.state_dict(),
                "optimizer_state_dict": {"state": {}, "param_groups": []}, "epoch": 33}, release_file)
    save_file(released.vit.state_dict(), str(tmp_path / "vit.safetensors"))
    torch.save(released.resnet50.state_dict(), tmp_path / "resnet.pth")

    fresh = build_zoo_model("ahiq", **TINY_AHIQ).eval()
    load_strict(fresh, join_ahiq(read_release(release_file), released.vit.state_dict(),
                                 released.resnet50.state_dict()))
    assert checkpoints_main(["ahiq", "--release", str(release_file), "--vit", str(tmp_path / "vit.safetensors"),
                             "--cnn", str(tmp_path / "resnet.pth"), "--out", str(tmp_path / "ahiq.safetensors")]) == 0
    served = create_model("zoo:ahiq", weights=str(tmp_path / "ahiq.safetensors"), args=TINY_AHIQ).module
    pair = (torch.rand(1, 3, 224, 240), torch.rand(1, 3, 224, 240))
    with torch.inference_mode():
        assert torch.allclose(fresh(*pair), released(*pair)) and torch.allclose(served(*pair), released(*pair))
