"""Decoding untrusted image bytes into arrays, and encoding results, within limits.

The header is checked before any pixel is decoded, so a small file that claims to be
50,000 x 50,000 pixels is refused without allocating it. EXIF orientation is applied;
palette, CMYK, 16-bit, grayscale and alpha images are converted to the model's colour.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hybridserve.server.core.errors import PayloadTooLarge, UnprocessableImage, UnsupportedMediaType

SUPPORTED_FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff", "GIF": "gif"}
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@dataclass(frozen=True)
class ImageLimits:
    """Per-image limits; defaults are safe for a public endpoint (``Settings`` reads the environment's)."""

    max_pixels: int = 40_000_000
    max_side: int = 16_384

    def check(self, width: int, height: int, field: str = "image") -> None:
        """Raise ``PayloadTooLarge`` for an image of ``width`` x ``height`` beyond the limits."""
        if width * height > self.max_pixels or max(width, height) > self.max_side:
            raise PayloadTooLarge(f"{field}: {width}x{height} pixels exceeds the limit of {self.max_pixels} pixels "
                                  f"(at most {self.max_side} per side)")


def decode_image(data: bytes, color: str = "rgb", limits: ImageLimits | None = None, field: str = "image") -> np.ndarray:
    """Decode ``data`` to a uint8 array (H, W, 3) for rgb or (H, W, 1) for gray."""
    limits = limits or ImageLimits()
    if not data:
        raise UnprocessableImage(f"{field}: empty body, expected an encoded image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt = image.format
            if fmt not in SUPPORTED_FORMATS:
                raise UnsupportedMediaType(
                    f"{field}: format {fmt or 'unknown'} is not supported; send JPEG, PNG, WebP, BMP, TIFF or GIF"
                )
            limits.check(*image.size, field)
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_array(image, color)
    except (UnsupportedMediaType, PayloadTooLarge):
        raise
    except UnidentifiedImageError:
        raise UnsupportedMediaType(
            f"{field}: not a recognised image; send JPEG, PNG, WebP, BMP, TIFF or GIF bytes"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"{field}: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as exc:
        raise UnprocessableImage(f"{field}: the image is corrupt or truncated ({exc})") from None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def header_pixels(data: bytes) -> int | None:
    """Width x height as an encoded image's header says (nothing decoded); ``None`` where it cannot be read."""
    if len(data) >= 24 and data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR":  # PNG: the size at a fixed offset
        width, height = struct.unpack(">II", data[16:24])
        return width * height
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size[0] * image.size[1]
    except Exception:  # decode_image says what is wrong with it
        return None


def _to_array(image: Image.Image, color: str) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(image, dtype=np.int64)
        peak = 65535 if wide.max(initial=0) > 255 else 255
        image = Image.fromarray((wide.clip(0, peak) * 255 // peak).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray((np.asarray(image).clip(0, 1) * 255).round().astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    target = "L" if color == "gray" else "RGB"
    array = np.array(image.convert(target), dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise UnprocessableImage("image has no pixels")
    return np.ascontiguousarray(array)


def encode_image(array: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """Encode a uint8 (H, W, C) array as png, jpeg or webp."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    buffer = io.BytesIO()
    options = {"quality": quality} if fmt in ("jpeg", "webp") else {"compress_level": 1}
    Image.fromarray(array).save(buffer, format=OUTPUT_FORMATS[fmt], **options)
    return buffer.getvalue()


@dataclass(frozen=True)
class Placement:
    """Where the original image sits in the model input: model = original * scale + offset."""

    scale_x: float
    scale_y: float
    offset_x: float = 0.0
    offset_y: float = 0.0

    def boxes_to_original(self, boxes: np.ndarray) -> np.ndarray:
        """[K, 4] boxes (x1, y1, x2, y2) in model-input pixels, mapped to original-image pixels."""
        offset = np.array([self.offset_x, self.offset_y, self.offset_x, self.offset_y])
        scale = np.array([self.scale_x, self.scale_y, self.scale_x, self.scale_y])
        return (boxes - offset) / scale


def resize_for_model(array: np.ndarray, size: tuple[int, int], policy: str, fill: int = 0) -> tuple[np.ndarray, Placement]:
    """Resize a uint8 HWC array to ``size`` = (height, width) under a resize policy."""
    height, width = array.shape[:2]
    target_h, target_w = size
    if policy == "none":
        if (height, width) != (target_h, target_w):
            from hybridserve.server.core.errors import InvalidInput

            raise InvalidInput(f"image must be exactly {target_w}x{target_h} pixels, got {width}x{height}")
        return array, Placement(1.0, 1.0)
    if (height, width) == (target_h, target_w):  # every policy leaves an image of the model's size as it is
        return array, Placement(1.0, 1.0)
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    if policy == "stretch":
        out = image.resize((target_w, target_h), Image.BILINEAR)
        placement = Placement(target_w / width, target_h / height)
    elif policy == "letterbox":
        scale = min(target_w / width, target_h / height)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        canvas = Image.new(image.mode, (target_w, target_h), fill)
        canvas.paste(image.resize((new_w, new_h), Image.BILINEAR), (0, 0))
        out, placement = canvas, Placement(new_w / width, new_h / height)
    else:  # center_crop: shorter side to the target, then crop the middle
        scale = max(target_w / width, target_h / height)
        new_w, new_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
        left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
        out = image.resize((new_w, new_h), Image.BILINEAR).crop((left, top, left + target_w, top + target_h))
        placement = Placement(new_w / width, new_h / height, -left, -top)
    result = np.array(out, dtype=np.uint8)
    return (result[:, :, None] if result.ndim == 2 else result), placement
