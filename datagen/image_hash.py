"""Image fingerprints for deduplication and decontamination: bytes, pixels and a perceptual hash.

- `sha256` of the image member's bytes: the same file stored twice.
- `pixel_sha256`: sha256 of the decoded RGB pixels and the size: the same picture stored in
  another file (a JPEG re-saved as PNG, different metadata), which the bytes' hash misses.
- `phash`: the 64-bit DCT perceptual hash of `imagehash.phash` (hash_size 8, highfreq_factor 4),
  the same bits in the same order: greyscale, Lanczos resize to 32x32, 2-D DCT-II, the top-left
  8x8 coefficients compared with their median, row-major, first bit most significant. A resized
  or re-compressed copy lands a few bits away; `near_dup` looks for pairs within Hamming
  distance k.

Why our own: the image is decoded once for every fingerprint and filter (not once per library),
and the bits come back as one integer, not an object. The DCT is scipy's, the one imagehash calls:
a cheaper 8x32 cosine-basis product gives the same bits except where coefficients tie at the
median (flat or gradient pictures), where floating-point noise decides. tests/test_curate_units.py
checks it against the `imagehash` package.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image, ImageOps
from scipy import fftpack

HASH_SIZE = 8
HIGHFREQ_FACTOR = 4
_N = HASH_SIZE * HIGHFREQ_FACTOR
_WEIGHTS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def open_image(data: bytes) -> Image.Image:
    """Decode image bytes, upright (EXIF orientation applied); raises OSError/ValueError on bad bytes."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return ImageOps.exif_transpose(img)


def phash(image: Image.Image) -> int:
    """The 64-bit perceptual hash of `image` as an unsigned int (imagehash.phash's bits)."""
    grey = image.convert("L").resize((_N, _N), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    low = fftpack.dct(fftpack.dct(pixels, axis=0), axis=1)[:HASH_SIZE, :HASH_SIZE]
    bits = (low > np.median(low)).ravel()
    return int(_WEIGHTS[bits].sum(dtype=np.uint64))


def pixel_sha256(image: Image.Image) -> str:
    """sha256 of the RGB pixels and the size (mode and container ignored)."""
    rgb = image.convert("RGB")
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Bits that differ between 64-bit hashes (element-wise)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))
