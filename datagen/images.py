"""Decode and validate one input image, with bounded memory and a documented decision per case.

Decisions (docs/bad-input.md, "Datagen inputs"):

| input                               | decision                                                      |
|-------------------------------------|---------------------------------------------------------------|
| zero-byte file                      | skip, `empty: zero-byte file`                                 |
| non-image bytes, corrupt, truncated | skip, `decode: <PIL's message>`                               |
| more than `max_pixels` (bomb)       | skip, `too_large: WxH > N pixels`; checked on the header, the |
|                                     | pixels are never decoded                                      |
| a side below `min_side` (e.g. 1x1)  | skip, `too_small: WxH, min side N`                            |
| grayscale, palette, CMYK, YCbCr...  | convert to RGB                                                |
| alpha (RGBA, LA, PA, P+transparency)| composite on white, then RGB                                  |
| 16-bit / 32-bit int / float         | scale to 8 bits (16-bit: >> 8; others: min-max), then RGB     |
| EXIF orientation != 1               | rotate/flip upright (`ImageOps.exif_transpose`)               |
| animated (GIF, APNG, WebP)          | first frame                                                   |

Stored image member (`ImageOutput`, `--image-format`, `--encode-quality`): one member type per
job, so `WebDataset(...).to_tuple("jpg", ...)`, Hugging Face's `webdataset` loader and NeMo
Curator read every sample alike.

- `jpg` (default, img2dataset's): every image is stored as `.jpg`. A JPEG input that needs no
  conversion keeps its own bytes (re-encoding would only lose quality); anything else is the
  upright RGB image encoded as JPEG at `quality` (default 95).
- `keep`: the input's own bytes whenever decoding needed no conversion that changes how a reader
  sees the pixels (RGB/L/P in JPEG/PNG/WebP without EXIF rotation), under their own extension, so
  a job may mix `.png` and `.jpg`; other images are encoded as `.jpg`.

Either way boxes are computed on the upright RGB image, and the stored image looks the same.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

#: Default limits: 64 MP is ~8000x8000, above any web image worth OCRing and far below a bomb.
DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MIN_SIDE = 8
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_KEEP_MODES = {"RGB", "L"}
IMAGE_FORMATS = ("jpg", "keep")
DEFAULT_ENCODE_QUALITY = 95


class ImageRejected(Exception):
    """The image is skipped; `error` is the `reason: detail` string for the sidecar."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.error = f"{reason}: {detail}"


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE


@dataclass(frozen=True)
class ImageOutput:
    """How the stored image member is written; see the module docstring."""

    format: str = "jpg"  # one of IMAGE_FORMATS
    quality: int = DEFAULT_ENCODE_QUALITY  # JPEG quality of re-encoded images, 1-95

    def __post_init__(self) -> None:
        if self.format not in IMAGE_FORMATS:
            raise ValueError(f"image format {self.format!r} is not one of {', '.join(IMAGE_FORMATS)}")
        if not 1 <= self.quality <= 95:  # PIL: above 95 only grows the file
            raise ValueError(f"JPEG quality {self.quality} is not in 1..95")


@dataclass
class DecodedImage:
    """An upright RGB image plus what to store for it."""

    image: Image.Image  # RGB, upright
    orig_width: int  # as stored in the file, before EXIF rotation
    orig_height: int
    data: bytes  # the bytes to store as the shard's image member
    ext: str  # their extension
    conversions: list[str]  # what was done, e.g. ["exif_transpose", "CMYK->RGB"]

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), output: ImageOutput = ImageOutput()) -> DecodedImage:
    """Decode `data` into an upright RGB image (and the bytes to store for it, per `output`) or
    raise `ImageRejected` with the reason."""
    if not data:
        raise ImageRejected("empty", "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        width, height = img.size  # from the header; nothing decoded yet
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected("too_large", str(e)) from e
    except Exception as e:  # PIL raises many types for garbage (UnidentifiedImageError, SyntaxError, ...)
        raise ImageRejected("decode", _short(e)) from e
    if width * height > limits.max_pixels:
        raise ImageRejected("too_large", f"{width}x{height} > {limits.max_pixels} pixels")
    if min(width, height) < limits.min_side:
        raise ImageRejected("too_small", f"{width}x{height}, min side {limits.min_side}")
    fmt = img.format
    try:
        img.seek(0)
        img.load()
    except Exception as e:
        raise ImageRejected("decode", _short(e)) from e

    conversions: list[str] = []
    orientation = img.getexif().get(0x0112, 1)
    if orientation not in (1, None):
        img = ImageOps.exif_transpose(img)
        conversions.append(f"exif_transpose:{orientation}")
    keep = (fmt in _KEEP_FORMATS and img.mode in _KEEP_MODES and not conversions
            and (output.format == "keep" or fmt == "JPEG"))
    if img.mode != "RGB":
        conversions.append(f"{img.mode}->RGB")
        img = to_rgb(img)
    if keep:
        return DecodedImage(img, width, height, data, _KEEP_FORMATS[fmt], conversions)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=output.quality)
    return DecodedImage(img, width, height, buf.getvalue(), "jpg", conversions)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; alpha composited on white, high bit depths scaled down."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16) >> 8
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
        return Image.fromarray(scaled.round().astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _short(e: Exception) -> str:
    """First line of the message, without object addresses (so reasons are deterministic)."""
    text = _OBJECT_REPR.sub("input", str(e) or type(e).__name__)
    return text.splitlines()[0][:200]
