"""The result of ``restore``: the restored picture as bytes, with helpers to decode it.

The other tasks return the wire schemas themselves (``ClassificationResult``,
``DetectionResult``, ``AssessmentResult``, whose helpers live in ``schemas.py``); a restored
image travels as raw bytes, so it gets this small class rather than a base64 string.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hybridserve_client.schemas import RestorationResult

if TYPE_CHECKING:
    import os

    import numpy as np
    from PIL import Image


@dataclass(frozen=True, repr=False)
class RestoredImage:
    """A restored image: ``data`` is encoded in ``format`` (png, jpeg or webp)."""

    model: str
    width: int
    height: int
    format: str
    data: bytes

    def __repr__(self) -> str:
        return (f"RestoredImage(model={self.model!r}, width={self.width}, height={self.height}, "
                f"format={self.format!r}, {len(self.data)} bytes)")

    @classmethod
    def from_schema(cls, result: RestorationResult) -> RestoredImage:
        return cls(result.model, result.width, result.height, result.format, base64.b64decode(result.image))

    def to_schema(self) -> RestorationResult:
        return RestorationResult(model=self.model, width=self.width, height=self.height, format=self.format,
                                 image=base64.b64encode(self.data).decode("ascii"))

    def image(self) -> Image.Image:
        """The restored image, decoded, as a PIL image."""
        from PIL import Image

        picture = Image.open(io.BytesIO(self.data))
        picture.load()
        return picture

    def array(self) -> np.ndarray:
        """The restored image as a numpy array (H, W, C) of uint8."""
        import numpy as np

        return np.asarray(self.image())

    def save(self, path: str | os.PathLike) -> None:
        """Write the encoded bytes to ``path`` (as they came: no re-encoding)."""
        Path(path).write_bytes(self.data)
