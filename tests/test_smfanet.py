"""A user's own architecture through ``python:<file>:<factory>``: SMFANet x4 served on Set5.

SMFANet is unknown to spandrel; ``tests/fixtures/smfanet.py`` stands for the user's code. Served
through the HTTP API, the published checkpoint must reproduce the paper's Set5 x4 PSNR-Y, 32.25 dB,
with the protocol of ../shared/eval/README.md (uint8 output, 4-pixel border shaved, unrounded luma Y,
mean over the five images).
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import LocalServer, needs_eval, write_spec
from tests.test_published_checkpoints import SET5, load_rgb, psnr_y

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "smfanet.py"
PUBLISHED_SET5_X4_PSNR_Y = 32.25


@pytest.fixture(scope="module")
def smfanet_server(tmp_path_factory):
    checkpoint = needs_eval("sr", "checkpoints", "smfanet_x4.pth")
    repo = tmp_path_factory.mktemp("smfanet")
    write_spec(repo, "smfanet-x4", task="restoration", architecture=f"python:{FIXTURE}:SMFANet",
               architecture_args={"dim": 36, "n_blocks": 8, "ffn_scale": 2, "upscaling_factor": 4},
               weights=str(checkpoint), preprocessing={"normalize": False, "tile": 256, "tile_overlap": 16},
               restoration={"kind": "super-resolution"})
    server = LocalServer(repo).wait_live(timeout=300)
    yield server
    server.stop()


def test_smfanet_x4_served_from_user_code_reproduces_the_published_set5_psnr(smfanet_server):
    values = []
    with httpx.Client(base_url=smfanet_server.url, timeout=300) as client:
        info = client.get("/v1/models/smfanet-x4").json()
        assert info["status"] == "ready", info
        for name in SET5:
            lr_path = needs_eval("sr", "Set5", "LR_bicubic", "X4", f"{name}x4.png")
            lr = load_rgb(lr_path)
            hr = load_rgb(needs_eval("sr", "Set5", "HR", f"{name}.png"))[: lr.shape[0] * 4, : lr.shape[1] * 4]
            response = client.post("/v1/models/smfanet-x4/restore", content=lr_path.read_bytes(),
                                   headers={"Content-Type": "image/png"})
            assert response.status_code == 200, response.text
            served = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
            assert served.shape == hr.shape
            values.append(psnr_y(served, hr, shave=4))
    assert float(np.mean(values)) == pytest.approx(PUBLISHED_SET5_X4_PSNR_Y, abs=0.02)
