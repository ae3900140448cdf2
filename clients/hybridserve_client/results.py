"""What each task returns: the result schemas of the wire, and ``RestoredImage``.

Pure pydantic (numpy and Pillow are imported only by the helpers that decode pixels): the
server validates its answers against these classes and the client parses answers into them.
``restore`` returns a ``RestoredImage`` (the picture as bytes) rather than the base64 string of
``RestorationResult``; every other task returns its schema itself.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

if TYPE_CHECKING:
    import os

    import numpy as np
    from PIL import Image


def fixed_array(length: int, item: str) -> WithJsonSchema:
    """A tuple's JSON Schema as a fixed-length array, without JSON Schema 2020-12's ``prefixItems``,
    which OpenAPI 3.0 tools (client generators, schemathesis) do not all read."""
    return WithJsonSchema({"type": "array", "items": {"type": item}, "minItems": length, "maxItems": length})


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def json_line(self) -> str:
        """The result as one line of JSON (``hybridserve-client --json``; bulky fields left out)."""
        return self.model_dump_json()


# ---------------------------------------------------------------- classification


class ClassPrediction(_Schema):
    label: str
    index: int
    score: float = Field(ge=0.0, le=1.0)


class ClassificationResult(_Schema):
    model: str
    predictions: list[ClassPrediction]

    @property
    def top1(self) -> ClassPrediction:
        """The highest-scoring prediction."""
        return max(self.predictions, key=lambda prediction: prediction.score)

    def describe(self, name: str) -> str:
        """A few readable lines about the result of image ``name`` (``hybridserve-client`` prints them)."""
        rows = [f"  {p.score:7.4f}  {p.label}  (#{p.index})" for p in self.predictions]
        return f"{name}  ({self.model})\n" + "\n".join(rows)


# ---------------------------------------------------------------- detection


class Detection(_Schema):
    box: Annotated[tuple[float, float, float, float], fixed_array(4, "number")] = Field(
        description="[x1, y1, x2, y2] in input-image pixels.")
    label: str
    index: int
    score: float = Field(ge=0.0, le=1.0)


class DetectionResult(_Schema):
    model: str
    width: int
    height: int
    detections: list[Detection]

    @property
    def boxes(self) -> np.ndarray:
        """(N, 4) float32 array of [x1, y1, x2, y2]."""
        import numpy as np

        return np.array([d.box for d in self.detections], dtype=np.float32).reshape(-1, 4)

    @property
    def scores(self) -> np.ndarray:
        """(N,) float32 array of scores."""
        import numpy as np

        return np.array([d.score for d in self.detections], dtype=np.float32)

    @property
    def labels(self) -> list[str]:
        return [d.label for d in self.detections]

    def draw(self, image: Any, width: int = 2) -> Image.Image:
        """A copy of ``image`` (any client image input) with each box and its label and score drawn on it."""
        from PIL import ImageDraw

        from hybridserve_client.inputs import to_pil

        canvas = to_pil(image).convert("RGB")
        pen = ImageDraw.Draw(canvas)
        palette = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")
        for detection in self.detections:
            color = palette[detection.index % len(palette)]
            x1, y1, x2, y2 = detection.box
            pen.rectangle((x1, y1, x2, y2), outline=color, width=width)
            pen.text((x1 + 2, max(0.0, y1 - 11)), f"{detection.label} {detection.score:.2f}", fill=color)
        return canvas

    def describe(self, name: str) -> str:
        rows = [f"  {d.label:<12} {d.score:5.2f}  [{', '.join(f'{v:.1f}' for v in d.box)}]" for d in self.detections]
        head = f"{name}  ({self.model}, {self.width}x{self.height}): {len(self.detections)} detection(s)"
        return "\n".join([head, *rows])

    def write(self, target: Path, source: Any) -> None:
        """Write ``source`` (the image sent) with the boxes drawn to ``target``."""
        self.draw(source).save(target)


# ---------------------------------------------------------------- restoration


class RestorationResult(_Schema):
    model: str
    width: int
    height: int
    format: Literal["png", "jpeg", "webp"]
    image: str = Field(description="The restored image, base64-encoded in `format`.")


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
        return _decode(self.data)

    def array(self) -> np.ndarray:
        """The restored image as a numpy array (H, W, C) of uint8."""
        import numpy as np

        return np.asarray(self.image())

    def save(self, path: str | os.PathLike) -> None:
        """Write the encoded bytes to ``path`` (as they came: no re-encoding)."""
        Path(path).write_bytes(self.data)

    def json_line(self) -> str:
        return self.to_schema().model_dump_json(exclude={"image"})

    def describe(self, name: str) -> str:
        return f"{name}  ({self.model}): {self.width}x{self.height} {self.format}, {len(self.data)} bytes"

    def write(self, target: Path, source: Any) -> None:
        self.save(target)


# ---------------------------------------------------------------- image quality assessment


class AssessmentResult(_Schema):
    model: str
    score: float
    kind: Literal["no-reference", "full-reference"]
    range: Annotated[tuple[float, float], fixed_array(2, "number")] = Field(
        description="[lowest, highest]: the scores the metric can give.")
    higher_is_better: bool

    def describe(self, name: str) -> str:
        better = "higher" if self.higher_is_better else "lower"
        return (f"{name}  ({self.model}): {self.score:.4f}  ({self.kind}, range "
                f"[{self.range[0]:g}, {self.range[1]:g}], {better} is better)")


# ---------------------------------------------------------------- segmentation


class SegmentClass(_Schema):
    index: int = Field(description="Class index (the mask's pixel value).")
    label: str
    pixels: int = Field(description="How many pixels of the mask have this class.")
    fraction: float = Field(description="pixels / (width * height).")
    rle: list[int] | None = Field(default=None, description=(
        "With format=rle: where this class is, as COCO's uncompressed RLE of a (height, width) mask: run "
        "lengths in column-major order, alternately outside and inside the class, starting outside (maybe 0)."))

    @field_validator("rle", mode="before")
    @classmethod
    def _no_runs(cls, value: Any) -> Any:
        return value or None  # a gRPC reply carries an empty list where JSON has none


class SegmentationResult(_Schema):
    model: str
    width: int = Field(description="The mask's width: the input image's, unless the model's spec says otherwise.")
    height: int
    labels: list[str] = Field(description="Every class label, by index: the mask's pixel value v means labels[v].")
    classes: list[SegmentClass] = Field(description="The classes present in the image, most pixels first.")
    mask_format: Literal["png", "rle"] = Field(default="png", description="How the mask travels: `mask` (png) "
                                               "or each class's `rle` (rle); the request's format option.")
    mask: str | None = Field(default=None, description="With format=png: base64 of an 8-bit grayscale PNG, "
                                                       "width x height, whose pixel values are class indices.")

    @field_validator("mask", mode="before")
    @classmethod
    def _no_mask(cls, value: Any) -> Any:
        return value or None  # a gRPC reply carries empty bytes where JSON has none

    def json_line(self) -> str:
        return self.model_dump_json(exclude={"mask"})

    def describe(self, name: str) -> str:
        rows = [f"  {c.fraction:7.2%}  {c.label}  (#{c.index}, {c.pixels} px)" for c in self.classes]
        return f"{name}  ({self.model}, {self.width}x{self.height}):\n" + "\n".join(rows)

    def write(self, target: Path, source: Any) -> None:
        """Write the mask to ``target`` (8-bit PNG, pixel value = class index)."""
        target.write_bytes(self.mask_png())

    def mask_png(self) -> bytes:
        """The mask as PNG bytes, e.g. to save as a file (``mask`` decoded; encoded from the runs for rle)."""
        if self.mask is not None:
            return base64.b64decode(self.mask)
        buffer = io.BytesIO()
        self.mask_image().save(buffer, format="PNG")
        return buffer.getvalue()

    def mask_image(self) -> Image.Image:
        """The mask as a PIL image (mode ``L``, ``width`` x ``height``): pixel value = class index."""
        if self.mask is None:
            from PIL import Image

            return Image.fromarray(self.mask_array(), mode="L")
        picture = _decode(base64.b64decode(self.mask))
        if picture.size != (self.width, self.height):
            raise ValueError(f"the mask is {picture.size[0]}x{picture.size[1]}, the result says "
                             f"{self.width}x{self.height}")
        return picture

    def mask_array(self) -> np.ndarray:
        """The mask as a numpy array (height, width) of uint8 class indices: ``labels[mask[y, x]]``."""
        import numpy as np

        if self.mask is not None:
            return np.asarray(self.mask_image())
        if self.mask_format != "rle":
            raise ValueError("this result carries no mask")
        flat = np.zeros(self.width * self.height, dtype=np.uint8)
        for segment in self.classes:
            position = 0
            for run, length in enumerate(segment.rle or ()):
                if run % 2:
                    flat[position:position + length] = segment.index
                position += length
            if segment.rle and position != flat.size:
                raise ValueError(f"class {segment.index}'s runs cover {position} pixels, not {flat.size}")
        return flat.reshape((self.height, self.width), order="F")


def _decode(data: bytes) -> Image.Image:
    from PIL import Image

    picture = Image.open(io.BytesIO(data))
    picture.load()
    return picture
