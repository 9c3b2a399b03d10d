"""Test inputs for the OCR area: rendered text images, real photos, bad files, a local HTTP server.

Rendered images use the DejaVu/STIX fonts matplotlib ships; real photos are matplotlib's sample
data (a portrait, the matplotlib logo, an icon without text).
"""

from __future__ import annotations

import functools
import http.server
import io
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

MPL_DATA = Path(matplotlib.__file__).parent / "mpl-data"
FONTS = MPL_DATA / "fonts" / "ttf"
SAMPLES = MPL_DATA / "sample_data"


@dataclass(frozen=True)
class Rendered:
    name: str
    text: str
    font: str
    size: int
    angle: float
    fg: tuple[int, int, int]
    bg: tuple[int, int, int]


#: Known strings in several fonts, sizes, rotations and colours.
RENDERED = [
    Rendered("sign_mack", "MACK SHOP", "DejaVuSans-Bold.ttf", 44, 0, (0, 0, 0), (255, 255, 255)),
    Rendered("serif_open", "Open daily 9 to 5", "DejaVuSerif.ttf", 36, 0, (20, 20, 120), (250, 250, 235)),
    Rendered("mono_code", "ORDER 4711", "DejaVuSansMono.ttf", 40, 4, (255, 255, 255), (30, 60, 160)),
    Rendered("stix_coffee", "Fresh Coffee", "STIXGeneral.ttf", 48, -5, (180, 20, 20), (255, 240, 120)),
    Rendered("oblique_exit", "EXIT", "DejaVuSans-Oblique.ttf", 56, 8, (255, 255, 255), (0, 120, 40)),
    Rendered("small_print", "Printed in 2024", "DejaVuSans.ttf", 26, 0, (60, 60, 60), (220, 220, 220)),
    Rendered("lower_sentence", "quick brown fox jumps", "DejaVuSans.ttf", 30, 0, (0, 0, 0), (255, 255, 255)),
    Rendered("price_tag", "Price: $12.99", "DejaVuSerif-Bold.ttf", 42, -3, (255, 255, 0), (20, 20, 20)),
    Rendered("mono_time", "10:45 PM", "DejaVuSansMono-Bold.ttf", 52, 12, (0, 80, 0), (230, 255, 230)),
    Rendered("stix_italic", "Library", "STIXGeneralItalic.ttf", 60, 0, (90, 0, 90), (255, 255, 255)),
    Rendered("tiny_caps", "NO ENTRY", "DejaVuSans-Bold.ttf", 18, 0, (200, 0, 0), (255, 255, 255)),
    Rendered("upside_down", "DOWN UNDER", "DejaVuSans-Bold.ttf", 40, 180, (0, 0, 0), (255, 255, 255)),
    Rendered("two_lines", "FIRST LINE\nsecond line", "DejaVuSans.ttf", 36, 0, (0, 0, 0), (255, 255, 255)),
]


#: The word-level set: multi-word lines in caps, mixed and lower case, digits and symbols.
WORD_TEXTS = [
    "MAIN STREET STATION", "SALE 50% OFF TODAY", "NO PARKING ANY TIME", "Opening hours 9 to 5",
    "DANGER HIGH VOLTAGE", "Fresh fruit and vegetables", "Platform 3 trains to Leeds", "CITY HALL",
    "Welcome to Springfield", "Exit only no entry", "Ticket office closed", "Hot coffee 2.50",
    "Call 555-0199 now", "Room 204 B", "Speed limit 30", "Buy 2 get 1 free", "EST. 1987", "Wi-Fi password inside",
    "Gate 12 boarding", "Keep left", "PUSH", "Pharmacy open 24/7", "Net weight 500g", "Car wash $8",
]
WORD_FONTS = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
              "DejaVuSansMono.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSansMono-Bold.ttf", "STIXGeneral.ttf",
              "DejaVuSerif-Italic.ttf", "DejaVuSans-BoldOblique.ttf"]


def word_signs(seed: int = 7) -> list[Rendered]:
    """Every WORD_TEXTS line once: cycling fonts, sizes from small print (16 px) up, slight rotations
    (plus one upside down), dark-on-light and light-on-dark colours. Deterministic."""
    import random

    rng = random.Random(seed)
    specs = []
    for i, text in enumerate(WORD_TEXTS):
        dark = tuple(rng.randint(0, 80) for _ in range(3))
        light = tuple(rng.randint(200, 255) for _ in range(3))
        fg, bg = (light, dark) if i % 4 == 3 else (dark, light)
        size = 16 + 2 * (i % 3) if i % 6 == 5 else rng.randint(24, 52)
        angle = 180.0 if i == 7 else round(rng.uniform(-7, 7), 1)
        specs.append(Rendered(f"words_{i:02d}", text, WORD_FONTS[i % len(WORD_FONTS)], size, angle, fg, bg))
    return specs


def render(spec: Rendered) -> Image.Image:
    """Draw `spec.text` (lines split at `\\n`) with a margin, rotated by `spec.angle` degrees."""
    font = ImageFont.truetype(str(FONTS / spec.font), spec.size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = probe.multiline_textbbox((0, 0), spec.text, font=font, spacing=spec.size // 2)
    w, h = right - left + 2 * spec.size, bottom - top + 2 * spec.size
    img = Image.new("RGB", (w, h), spec.bg)
    ImageDraw.Draw(img).multiline_text((spec.size - left, spec.size - top), spec.text, font=font, fill=spec.fg,
                                       spacing=spec.size // 2)
    if spec.angle:
        img = img.rotate(spec.angle, expand=True, fillcolor=spec.bg, resample=Image.Resampling.BICUBIC)
    return img


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


def text_image(text: str = "HELLO 42", size: tuple[int, int] = (320, 96)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    font = ImageFont.truetype(str(FONTS / "DejaVuSans-Bold.ttf"), 36)
    ImageDraw.Draw(img).text((16, 24), text, font=font, fill="black")
    return img


def no_text_image(size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A smooth gradient: nothing an OCR engine can read."""
    x = np.linspace(0, 255, size[0], dtype=np.float32)
    y = np.linspace(0, 255, size[1], dtype=np.float32)[:, None]
    arr = np.stack([np.broadcast_to(x, (size[1], size[0])), np.broadcast_to(y, (size[1], size[0])),
                    np.full((size[1], size[0]), 128.0)], axis=-1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def real_photos() -> dict[str, tuple[bytes, bool | None]]:
    """name -> (bytes, has_text) from matplotlib's sample data.

    The portrait has no writing but uniform insignia the engine may read as symbols, so no claim
    is made about its text (None); the logo has text; the RGBA icon has none.
    """
    return {
        "photo_hopper": ((SAMPLES / "grace_hopper.jpg").read_bytes(), None),
        "photo_logo": ((SAMPLES / "logo2.png").read_bytes(), True),
        "photo_icon": ((SAMPLES / "Minduka_Present_Blue_Pack.png").read_bytes(), False),
    }


# -- bad inputs ------------------------------------------------------------------------------
def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (IHDR + an empty-ish IDAT)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_rotated_jpeg(img: Image.Image, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(img, exif=exif.tobytes())


def bad_inputs() -> dict[str, bytes]:
    """file name -> bytes for every bad-input case of docs/bad-input.md (decisions in datagen/images.py)."""
    base = text_image("CMYK 7")
    good_png = png_bytes(text_image("TRUNCATED"))
    rgba = text_image("ALPHA 3").convert("RGBA")
    rgba.putalpha(200)
    gray16 = Image.fromarray(np.asarray(text_image("DEEP 16").convert("L"), dtype=np.uint16) * 257)  # mode I;16
    return {
        "zero.jpg": b"",
        "notimage.jpg": b"this is plain text, not a picture\n" * 4,
        "truncated.png": good_png[: len(good_png) // 2],
        "corrupt.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 3,
        "bomb.png": png_bomb(),
        "tiny.png": png_bytes(Image.new("RGB", (1, 1), "white")),
        "gray.png": png_bytes(text_image("GRAY 5").convert("L")),
        "cmyk.jpg": jpeg_bytes(base.convert("CMYK")),
        "alpha.png": png_bytes(rgba),
        "deep16.png": png_bytes(gray16),
        "rotated.jpg": exif_rotated_jpeg(text_image("ROTATE 9").rotate(90, expand=True), orientation=6),
        "blank.png": png_bytes(no_text_image()),
    }


#: What the pipeline must record for each bad input (None: a successful sample).
BAD_EXPECTED = {
    "zero.jpg": "empty", "notimage.jpg": "decode", "truncated.png": "decode", "corrupt.jpg": "decode",
    "bomb.png": "too_large", "tiny.png": "too_small", "gray.png": None, "cmyk.jpg": None, "alpha.png": None,
    "deep16.png": None, "rotated.jpg": None, "blank.png": None,
}


# -- a local HTTP server --------------------------------------------------------------------
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass


class LocalServer:
    """Serve a folder on 127.0.0.1 (random port) from a thread."""

    def __init__(self, root: Path):
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "LocalServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
