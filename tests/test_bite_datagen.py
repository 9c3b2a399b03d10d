"""Documented decisions of the data engine that users rely on: image conversions, OCR grid words,
and generator info that is cheap to ask for."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip3.datagen.images import decode_image
from blip3.datagen.ocr_captions import format_entry

REPO = Path(__file__).resolve().parents[1]


def _tiff(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    return buf.getvalue()


@pytest.mark.parametrize("mode, lo, hi", [("I", -70_000, 900_000), ("F", -3.5, 12.25)])
def test_32_bit_images_are_min_max_scaled_to_8_bits(mode, lo, hi):
    """A 32-bit int / float ramp spans the full 8-bit range (min -> 0, max -> 255), monotonically."""
    ramp = np.linspace(lo, hi, 64, dtype=np.float64)
    arr = np.tile(ramp, (16, 1)).astype(np.int32 if mode == "I" else np.float32)
    img = Image.fromarray(arr, mode)
    assert img.mode == mode
    d = decode_image(_tiff(img))
    assert d.conversions == [f"{mode}->RGB"] and d.image.mode == "RGB"
    out = np.asarray(d.image)[0, :, 0].astype(int)
    assert out[0] == 0 and out[-1] == 255
    assert (np.diff(out) >= 0).all() and len(set(out.tolist())) > 50  # a ramp, not clipped to 0/255
    assert abs(out[32] - round((ramp[32] - lo) * 255 / (hi - lo))) <= 1


def test_flat_32_bit_image_is_black_not_a_division_by_zero():
    d = decode_image(_tiff(Image.fromarray(np.full((16, 16), 7.0, dtype=np.float32), "F")))
    assert np.asarray(d.image).max() == 0


def test_palette_with_transparency_is_composited_on_white():
    """P image whose index 0 is transparent: those pixels become white, the opaque ones keep their colour."""
    img = Image.new("P", (24, 16), 0)
    img.putpalette([0, 0, 0] + [200, 20, 20] + [0, 0, 0] * 254)  # index 0 black (transparent), 1 red
    for x in range(12, 24):
        for y in range(16):
            img.putpixel((x, y), 1)
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)
    d = decode_image(buf.getvalue())
    assert d.conversions == ["P->RGB"]
    px = np.asarray(d.image)
    assert (px[:, :12] == 255).all()  # transparent black became white, not black
    assert (px[:, 12:] == [200, 20, 20]).all()
    stored = np.asarray(Image.open(io.BytesIO(d.data)).convert("RGB"))
    assert stored[:, :8].min() >= 235 and d.ext == "jpg"  # stored as the composited RGB (JPEG edges ring)


@pytest.mark.parametrize(
    "cx, cy, words",
    [
        (0.1, 0.1, "at the top left"),
        (0.5, 0.1, "above the center"),
        (0.9, 0.1, "at the top right"),
        (0.1, 0.5, "to the left of the center"),
        (0.5, 0.5, "in the center"),
        (0.9, 0.5, "to the right of the center"),
        (0.1, 0.9, "at the bottom left"),
        (0.5, 0.9, "below the center"),
        (0.9, 0.9, "at the bottom right"),
    ],
)
def test_all_nine_ocr_grid_words(cx, cy, words):
    box = [cx - 0.05, cy - 0.05, cx + 0.05, cy + 0.05]
    assert format_entry("a", box, 1) == f'"a" located {words}'


@pytest.mark.parametrize("v, cell", [(0.333, 0), (0.334, 1), (0.666, 1), (0.667, 2)])
def test_ocr_grid_borders_at_thirds(v, cell):
    row = ("at the top left", "to the left of the center", "at the bottom left")
    assert format_entry("a", [0.0, v, 0.0, v], 1) == f'"a" located {row[cell]}'


def test_ocr_generator_info_loads_no_model():
    """Asking what would run (e.g. to compare with finished shards) must not import or load the engine."""
    code = (
        "import sys\n"
        "from blip3.datagen.ocr import OcrConfig\n"
        "from blip3.datagen.ocr_engines import RapidOcrEngine\n"
        "def refuse(self): raise SystemExit('engine loaded')\n"
        "RapidOcrEngine.load = refuse\n"
        "info = OcrConfig(min_confidence=0.7)().generator_info()\n"
        "assert info['engine'] == 'rapidocr' and info['engine_version'] and info['min_confidence'] == 0.7, info\n"
        "loaded = [m for m in ('rapidocr_onnxruntime', 'onnxruntime', 'cv2') if m in sys.modules]\n"
        "print('LOADED', loaded)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "LOADED []" in r.stdout


@pytest.mark.parametrize("v, row", [(1 / 3, "to the left of the center"), (2 / 3, "at the bottom left")])
def test_ocr_grid_thirds_belong_to_the_next_cell(v, row):
    """A centre exactly on a third falls in the cell below / to the right (cells are [a, b) intervals)."""
    assert format_entry("a", [0.0, v, 0.0, v], 1) == f'"a" located {row}'


def test_ocr_captions_are_the_twelve_published_variants_in_order():
    from blip3.datagen.ocr_captions import build_captions

    caps = build_captions([{"text": "MACK SHOP", "bbox": [0.192, 0.037, 0.817, 0.203]}], "a shop")
    assert [(c["granularity"], c["include_datacomp_raw_cap"]) for c in caps] == [
        (g, raw) for raw in (False, True) for g in (0, 1, 2, 3, 4, 5)]
    assert caps[5]["text"] == 'The image contains <ocr>MACK SHOP</ocr><bbox>[0.192, 0.037][0.817, 0.203]</bbox>.'


def test_caption_style_is_immutable():
    """Functions take `CaptionStyle()` as a shared default argument: it must not be changeable."""
    from dataclasses import FrozenInstanceError

    from blip3.datagen.ocr_captions import CaptionStyle

    with pytest.raises(FrozenInstanceError):
        CaptionStyle().lead_in = "changed"


def test_ocr_fractions_use_denominators_up_to_twenty():
    """Granularity 2 writes the centre as the nearest fraction with denominator <= 20, as the dataset does."""
    x, y = 1 / 21, 0.05  # 1/21 is not allowed (nearest: 1/20); 1/20 is (19 would give 1/19)
    assert format_entry("a", [x, y, x, y], 2) == (
        '"a" located at 1/20 of the image from top to bottom and 1/20 of the image from left to right')
