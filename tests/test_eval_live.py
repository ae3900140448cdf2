"""``hybridserve eval --url``: the served path measured through the client SDK, against running servers.

- HTTP, ``hybridserve serve --no-ray`` in a subprocess: SMFANet x4 (the user's own architecture,
  tests/fixtures/smfanet.py) on Set5 gives the paper's 32.25 dB PSNR-Y, and an SSIM-Y equal to
  scikit-image's on the model's own output called directly.
- The session's Ray Serve instance: the built-in classifier (through gRPC), detector, quality
  model and segmenter (through HTTP) on their held-out sets give their model cards' numbers.
- Slower tier (``-m slow``): CRAFT x4 on Set5 equals spandrel called directly (32.39 dB), and
  DnCNN sigma 25 on Set12 gives about 30.4 dB.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hybridserve.models import create_model
from hybridserve.server.cli.main import main
from tests.conftest import SPECS, LocalServer, needs_eval, write_spec
from tests.test_eval_heldout import (  # noqa: F401 (heldout: the exported held-out sets, a fixture)
    CARD_CLASS_IOU,
    CARD_MAP50_VOC,
    CARD_MIOU,
    CARD_SRCC_WITHIN,
    CARD_TOP1,
    heldout,
)
from tests.test_published_checkpoints import SET5, psnr_y

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "smfanet.py"
SMFANET = {"dim": 36, "n_blocks": 8, "ffn_scale": 2, "upscaling_factor": 4}
PUBLISHED_SMFANET_X4_SET5 = 32.25


def eval_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["eval", *argv, "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def ssim_y(output: np.ndarray, target: np.ndarray, crop: int) -> float:
    from skimage.metrics import structural_similarity

    def luma(rgb: np.ndarray) -> np.ndarray:
        rgb = rgb.astype(np.float64)
        return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0

    return structural_similarity(luma(output)[crop:-crop, crop:-crop], luma(target)[crop:-crop, crop:-crop],
                                 data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


def direct_set5(module: torch.nn.Module) -> tuple[list[float], list[float]]:
    """PSNR-Y and SSIM-Y of ``module`` called directly on Set5 x4 (the README's protocol)."""
    psnrs, ssims = [], []
    for name in SET5:
        lr = np.asarray(Image.open(needs_eval("sr", "Set5", "LR_bicubic", "X4", f"{name}x4.png")).convert("RGB"))
        hr = np.asarray(Image.open(needs_eval("sr", "Set5", "HR", f"{name}.png")).convert("RGB"))
        hr = hr[: lr.shape[0] * 4, : lr.shape[1] * 4]
        with torch.inference_mode():
            out = module(torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].float() / 255)[0]
        out = out.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
        psnrs.append(psnr_y(out, hr, 4))
        ssims.append(ssim_y(out, hr, 4))
    return psnrs, ssims


@pytest.fixture(scope="module")
def smfanet_server(tmp_path_factory):
    checkpoint = needs_eval("sr", "checkpoints", "smfanet_x4.pth")
    repo = tmp_path_factory.mktemp("eval-smfanet")
    write_spec(repo, "smfanet-x4", task="restoration", architecture=f"python:{FIXTURE}:SMFANet",
               architecture_args=SMFANET, weights=str(checkpoint),
               preprocessing={"normalize": False, "tile": 256, "tile_overlap": 16},
               restoration={"kind": "super-resolution"})
    server = LocalServer(repo).wait_live(timeout=300)
    yield server
    server.stop()


def test_smfanet_x4_set5_through_http_gives_the_published_psnr_y(smfanet_server, capsys) -> None:
    set5 = str(needs_eval("sr", "Set5"))
    report = eval_json(capsys, "restoration", "smfanet-x4", set5, "--scale", "4", "--url", smfanet_server.url)
    assert report["target"] == smfanet_server.url and report["count"] == 5
    assert report["protocol"] == {"channels": "y", "crop": 4, "scale": 4}
    assert report["metrics"]["psnr"] == pytest.approx(PUBLISHED_SMFANET_X4_SET5, abs=0.02)
    module = create_model(f"python:{FIXTURE}:SMFANet", weights=str(needs_eval("sr", "checkpoints", "smfanet_x4.pth")),
                          args=SMFANET).module
    psnrs, ssims = direct_set5(module)
    assert [row["image"] for row in report["rows"]] == SET5
    for row, psnr, ssim in zip(report["rows"], psnrs, ssims):
        assert row["psnr"] == pytest.approx(psnr, abs=0.02) and row["ssim"] == pytest.approx(ssim, abs=2e-4)
    # The table: progress on stderr, the per-image rows and the means on stdout.
    assert main(["eval", "restoration", "smfanet-x4", set5, "--scale", "4", "--url", smfanet_server.url,
                 "--limit", "1"]) == 0
    out, err = capsys.readouterr()
    assert "smfanet-x4 [" in err and "1/1" in err
    assert "PSNR (dB)" in out and "baby" in out and "<- psnr" in out and "[#" not in out


def test_classifier_through_grpc_reproduces_its_card(server, heldout, capsys) -> None:
    server.need("classifier")
    report = eval_json(capsys, "classification", "classifier", str(heldout / "classification"),
                       "--url", f"grpc://{server.grpc_target}")
    assert report["target"].startswith("grpc://") and report["count"] == 450
    assert report["metrics"]["top1"] == pytest.approx(CARD_TOP1)


def test_detector_quality_and_segmenter_through_http_reproduce_their_cards(server, heldout, capsys) -> None:
    for model in ("detector", "quality", "segmenter"):
        server.need(model)
    url = server.http_url
    detection = eval_json(capsys, "detection", "detector", str(heldout / "detection" / "annotations.json"),
                          "--url", url)
    assert detection["target"] == url and detection["count"] == 200
    assert detection["metrics"]["map50"] == pytest.approx(CARD_MAP50_VOC, abs=0.01)  # COCO's 101 points vs VOC's
    for kind, srcc in CARD_SRCC_WITHIN.items():
        iqa = eval_json(capsys, "iqa", "quality", str(heldout / "iqa" / f"{kind}.csv"), "--url", url)
        assert iqa["count"] == 24 and iqa["metrics"]["srcc_per_group"] == pytest.approx(srcc, abs=0.005), kind
    segmentation = eval_json(capsys, "segmentation", "segmenter", str(heldout / "segmentation"), "--url", url)
    assert segmentation["count"] == 200 and round(segmentation["metrics"]["miou"], 3) == CARD_MIOU
    assert [row["IoU"] for row in segmentation["rows"]] == pytest.approx(CARD_CLASS_IOU, abs=0.0011)


@pytest.fixture(scope="module")
def published_server(tmp_path_factory):
    eval_root = needs_eval("sr", "checkpoints", "craft_x4.pth").parents[2]
    repo = tmp_path_factory.mktemp("eval-published")
    (repo / "craft-x4.yaml").write_text((SPECS / "craft-x4.yaml").read_text().replace("{eval}", str(eval_root)))
    write_spec(repo, "dncnn-25", task="restoration", architecture="spandrel",
               weights=str(needs_eval("denoise", "checkpoints", "dncnn_25.pth")),
               preprocessing={"normalize": False, "color": "gray", "mean": [0.0], "std": [1.0], "tile": 512,
                              "tile_overlap": 16},
               restoration={"kind": "denoising"})
    server = LocalServer(repo).wait_live(timeout=600)
    yield server
    server.stop()


@pytest.mark.slow
def test_craft_x4_set5_through_http_equals_spandrel_called_directly(published_server, capsys) -> None:
    import spandrel

    report = eval_json(capsys, "restoration", "craft-x4", str(needs_eval("sr", "Set5")), "--scale", "4",
                       "--url", published_server.url)
    descriptor = spandrel.ModelLoader().load_from_file(str(needs_eval("sr", "checkpoints", "craft_x4.pth"))).eval()
    psnrs, ssims = direct_set5(descriptor)
    assert report["metrics"]["psnr"] == pytest.approx(np.mean(psnrs), abs=0.02)
    assert report["metrics"]["psnr"] == pytest.approx(32.39, abs=0.02)  # ../shared/eval/README.md
    assert report["metrics"]["ssim"] == pytest.approx(np.mean(ssims), abs=2e-4)


@pytest.mark.slow
def test_dncnn_sigma_25_set12_through_http(published_server, capsys) -> None:
    report = eval_json(capsys, "restoration", "dncnn-25", str(needs_eval("denoise", "Set12")), "--noise-sigma", "25",
                       "--seed", "0", "--url", published_server.url)
    assert report["count"] == 12 and report["protocol"]["channels"] == "gray"
    assert report["metrics"]["psnr"] == pytest.approx(30.4, abs=0.1)  # published 30.44 (depends on the noise draw)
