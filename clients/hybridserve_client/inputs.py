"""Turning what a caller holds into encoded image bytes, and encoded bytes back into pictures.

Accepted inputs (``ImageInput``): a path (``str`` or ``Path``), encoded ``bytes``, a binary
file object, a PIL image, or a numpy array (H, W) or (H, W, C) of uint8 with 1, 3 or 4
channels. Encoded files travel as they are; pixels are encoded as PNG (lossless).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes], "Image.Image", "np.ndarray"]
ImageBatch = Union[list[ImageInput], tuple[ImageInput, ...]]  # several images: a result per image, in order

# Leading bytes of each format the server decodes.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"GIF8", "image/gif"),
)


@dataclass(frozen=True)
class EncodedImage:
    """An image ready to send: its bytes and their media type."""

    data: bytes
    content_type: str


def sniff_content_type(data: bytes) -> str:
    """The media type of encoded image bytes, from their signature (octet-stream when unknown)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, content_type in _MAGIC:
        if data.startswith(magic):
            return content_type
    return "application/octet-stream"


def encode_image(image: ImageInput) -> EncodedImage:
    """Encode any accepted input; raises TypeError for anything else."""
    if isinstance(image, EncodedImage):
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        data = Path(image).read_bytes()
    elif hasattr(image, "read"):
        data = image.read()
        if not isinstance(data, bytes):
            raise TypeError("file objects must be opened in binary mode ('rb')")
    else:
        data = _encode_pixels(image)
    return EncodedImage(data, sniff_content_type(data))


def _encode_pixels(image: Any) -> bytes:
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = array_to_pil(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def array_to_pil(array: Any) -> Image.Image:
    """A PIL image from a numpy array (H, W) or (H, W, 1|3|4) of uint8."""
    import numpy as np
    from PIL import Image

    if not isinstance(array, np.ndarray):
        raise TypeError(
            f"unsupported image input {type(array).__name__}: pass a path, bytes, a binary file, "
            "a PIL image or a numpy uint8 array (H, W[, C])")
    if array.dtype != np.uint8:
        raise TypeError(f"numpy images must be uint8 (H, W[, C]); got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise TypeError(f"numpy images must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array))


def to_pil(image: ImageInput) -> Image.Image:
    """Any accepted input as a decoded PIL image (used to draw on, or to read back a result)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if type(image).__module__ == "numpy":
        return array_to_pil(image)
    picture = Image.open(io.BytesIO(encode_image(image).data))
    picture.load()
    return picture


def is_batch(image: Any) -> bool:
    """Whether ``image`` is several images (a list or tuple) rather than one."""
    return isinstance(image, (list, tuple))
