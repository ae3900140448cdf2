"""Images in every awkward mode and encoding: a correct result or a clear 4xx, never a 5xx."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from hybridserve.server.core.errors import UnsupportedMediaType
from hybridserve.server.core.images import decode_image

RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, (30, 40, 3), dtype=np.uint8)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def variants() -> dict[str, bytes]:
    base = Image.fromarray(RGB)
    exif = base.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    frames = [Image.fromarray(np.roll(RGB, i, axis=1)) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return {
        "jpeg": encode(base, "JPEG"),
        "cmyk-jpeg": encode(base.convert("CMYK"), "JPEG"),
        "exif-rotated": encode(base, "JPEG", exif=exif),
        "grayscale": encode(base.convert("L"), "PNG"),
        "palette": encode(base.convert("P"), "PNG"),
        "alpha": encode(base.convert("RGBA"), "PNG"),
        "16-bit": encode(Image.fromarray((RGB[:, :, 0].astype(np.uint16) * 257)), "PNG"),
        "webp": encode(base, "WEBP"),
        "bmp": encode(base, "BMP"),
        "tiff": encode(base, "TIFF"),
        "animated-gif": buffer.getvalue(),
    }


VARIANTS = variants()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_mode_is_served(server, name):
    with httpx.Client(base_url=server.http_url, timeout=60) as client:
        response = client.post("/v1/models/timm-convnext/classify", content=VARIANTS[name],
                               headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 4


def test_exif_orientation_is_applied():
    array = decode_image(VARIANTS["exif-rotated"])
    assert array.shape == (40, 30, 3)  # displayed size: rotated


def test_modes_convert_to_the_model_colour():
    assert decode_image(VARIANTS["16-bit"]).shape == (30, 40, 3)
    assert decode_image(VARIANTS["alpha"], "gray").shape == (30, 40, 1)
    sixteen = decode_image(VARIANTS["16-bit"], "gray")[:, :, 0]
    assert np.abs(sixteen.astype(int) - RGB[:, :, 0]).max() <= 1  # 16-bit scaled down, not clipped


def test_svg_and_unknown_bytes_are_415():
    for data in (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", b"\x00\x01\x02garbage", b"GIF89a"):
        with pytest.raises(UnsupportedMediaType):
            decode_image(data)
