"""Image decoding at its boundaries: the size limits, the JPEG quality range, which inputs keep
their own bytes, and exact 16-bit scaling (each found unguarded by mutation testing)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from blip3.datagen.images import ImageLimits, ImageOutput, ImageRejected, decode_image


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_default_min_side_is_eight_pixels():
    assert decode_image(_png(Image.new("RGB", (8, 30), "red"))).image.size == (8, 30)
    assert decode_image(_png(Image.new("RGB", (30, 8), "red"))).image.size == (30, 8)
    with pytest.raises(ImageRejected) as e:
        decode_image(_png(Image.new("RGB", (7, 30), "red")))
    assert e.value.error == "too_small: 7x30, min side 8"
    with pytest.raises(ImageRejected, match="too_small: 30x7"):
        decode_image(_png(Image.new("RGB", (30, 7), "red")))


def test_max_pixels_is_inclusive():
    limits = ImageLimits(max_pixels=20 * 10, min_side=1)
    assert decode_image(_png(Image.new("RGB", (20, 10))), limits).width == 20
    with pytest.raises(ImageRejected) as e:
        decode_image(_png(Image.new("RGB", (20, 11))), limits)
    assert e.value.error == "too_large: 20x11 > 200 pixels"


def test_jpeg_quality_range_is_1_to_95():
    assert ImageOutput().quality == 95 and ImageOutput().format == "jpg"
    ImageOutput("jpg", 1)
    ImageOutput("keep", 95)
    for q in (0, 96):
        with pytest.raises(ValueError, match=f"JPEG quality {q} is not in 1..95"):
            ImageOutput("jpg", q)


def test_default_quality_is_95():
    png = _png(Image.effect_noise((64, 64), 60).convert("RGB"))
    assert decode_image(png).data == _jpeg(Image.open(io.BytesIO(png)).convert("RGB"), quality=95)


@pytest.mark.parametrize("fmt, mode, output, kept", [
    ("PNG", "RGB", "keep", True), ("PNG", "L", "keep", True), ("PNG", "RGB", "jpg", False),
    ("PNG", "P", "keep", False), ("PNG", "RGBA", "keep", False), ("WEBP", "RGB", "keep", True),
    ("JPEG", "L", "jpg", True), ("JPEG", "RGB", "keep", True), ("GIF", "L", "keep", False),
])
def test_which_inputs_keep_their_own_bytes(fmt, mode, output, kept):
    img = Image.effect_noise((40, 24), 50).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    data = buf.getvalue()
    d = decode_image(data, output=ImageOutput(output))
    assert (d.data == data) is kept
    ext = {"PNG": "png", "WEBP": "webp", "JPEG": "jpg"}.get(fmt)
    assert d.ext == (ext if kept else "jpg")
    assert d.image.mode == "RGB"
    assert Image.open(io.BytesIO(d.data)).format == ("JPEG" if not kept else fmt)


def test_a_kept_grayscale_image_still_reports_its_conversion():
    d = decode_image(_png(Image.new("L", (16, 16), 128)), output=ImageOutput("keep"))
    assert d.conversions == ["L->RGB"] and d.ext == "png"
    assert np.asarray(d.image)[0, 0].tolist() == [128, 128, 128]


def test_16_bit_keeps_the_high_byte():
    arr = np.array([[0, 255, 256, 0x1234, 65535] * 2] * 10, dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    d = decode_image(_png(img))
    assert np.asarray(d.image)[0, :5, 0].tolist() == [0, 0, 1, 0x12, 255]


def test_grey_with_alpha_is_composited_on_white():
    img = Image.new("LA", (16, 16), (0, 0))  # black, fully transparent
    img.paste((50, 255), (8, 0, 16, 16))  # right half: opaque dark grey
    d = decode_image(_png(img))
    assert d.conversions == ["LA->RGB"]
    px = np.asarray(d.image)
    assert (px[:, :8] == 255).all() and (px[:, 8:] == 50).all()


def test_orientation_one_is_left_alone():
    exif = Image.Exif()
    exif[0x0112] = 1
    data = _jpeg(Image.new("RGB", (40, 20), "blue"), exif=exif.tobytes())
    d = decode_image(data)
    assert d.conversions == [] and d.data == data and d.image.size == (40, 20)


def test_decode_errors_are_one_short_line():
    with pytest.raises(ImageRejected) as e:
        decode_image(b"\x89PNG\r\n\x1a\n" + b"x" * 500)
    assert e.value.error.startswith("decode: ") and "\n" not in e.value.error and "0x" not in e.value.error
    assert len(e.value.error) <= len("decode: ") + 200


def test_a_colour_key_on_a_grey_image_is_not_alpha():
    """Only palette images' transparency is composited (the documented rows): a grey PNG whose tRNS
    key marks black keeps its black pixels."""
    img = Image.new("L", (16, 16), 0)
    img.paste(200, (8, 0, 16, 16))
    d = decode_image(_png(img, transparency=0))
    assert d.conversions == ["L->RGB"]
    px = np.asarray(d.image)
    assert (px[:, :8] == 0).all() and (px[:, 8:] == 200).all()


def test_error_detail_is_the_first_line_without_addresses():
    from blip3.datagen.images import _short

    assert _short(ValueError("cannot identify <PIL.PngImagePlugin.PngImageFile object at 0x7f3a2c>\nmore")) == (
        "cannot identify input")
    assert _short(OSError()) == "OSError"  # an error without a message is named by its type
    assert _short(OSError("x" * 300)) == "x" * 200
