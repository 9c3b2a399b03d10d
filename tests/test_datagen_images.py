"""Decode/validate decisions for every bad input of docs/bad-input.md (no Ray: the unit under the pipeline)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from blip3.datagen.images import ImageLimits, ImageOutput, ImageRejected, decode_image
from tests.ocr_fixtures import BAD_EXPECTED, bad_inputs, png_bomb, jpeg_bytes, png_bytes, text_image

BAD = bad_inputs()


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_bad_input_gets_its_documented_decision(name):
    expected = BAD_EXPECTED[name]
    if expected is None:
        d = decode_image(BAD[name])
        assert d.image.mode == "RGB" and d.image.size == (d.width, d.height)
        assert Image.open(io.BytesIO(d.data)).size == d.image.size  # stored bytes show the same pixels
    else:
        with pytest.raises(ImageRejected) as e:
            decode_image(BAD[name])
        assert e.value.error.startswith(expected + ":")
        assert "0x" not in e.value.error  # reasons are deterministic (no object addresses)


def test_bomb_is_rejected_from_the_header_without_decoding():
    with pytest.raises(ImageRejected, match=r"too_large: .*900000000 pixels"):  # PIL's check, at open
        decode_image(BAD["bomb.png"], ImageLimits(max_pixels=10**10))
    with pytest.raises(ImageRejected, match=r"too_large: 20000x4000 > 64000000 pixels"):  # ours, below PIL's
        decode_image(png_bomb(20000, 4000))
    with pytest.raises(ImageRejected, match="too_large"):
        decode_image(png_bytes(text_image()), ImageLimits(max_pixels=1000))


def test_exif_rotation_is_applied_and_reencoded():
    d = decode_image(BAD["rotated.jpg"])
    # the file stores a 96x320 (portrait) image with orientation 6: upright it is 320x96
    assert (d.orig_width, d.orig_height) == (96, 320)
    assert (d.width, d.height) == (320, 96)
    assert d.ext == "jpg" and d.conversions[0] == "exif_transpose:6"
    assert Image.open(io.BytesIO(d.data)).size == (320, 96)


def test_modes_are_converted_faithfully():
    alpha = decode_image(BAD["alpha.png"])
    assert alpha.conversions == ["RGBA->RGB"]
    white = np.asarray(alpha.image)[0, 0]
    assert (white >= 250).all()  # composited on white
    deep = decode_image(BAD["deep16.png"])
    assert deep.conversions and deep.conversions[0].endswith("->RGB")
    arr = np.asarray(deep.image)
    assert arr.min() < 30 and arr.max() > 225  # 16-bit range scaled to 8 bits, not clipped
    cmyk = decode_image(BAD["cmyk.jpg"])
    assert cmyk.conversions == ["CMYK->RGB"] and cmyk.ext == "jpg"


def test_plain_images_keep_their_own_bytes():
    data = jpeg_bytes(text_image())
    d = decode_image(data)
    assert d.data == data and d.ext == "jpg" and d.conversions == []  # JPEG in: its own bytes
    keep = ImageOutput("keep")
    gray = decode_image(BAD["gray.png"], output=keep)
    assert gray.data == BAD["gray.png"] and gray.ext == "png"


def test_default_output_is_jpeg_at_the_given_quality():
    png = png_bytes(text_image(size=(200, 80)))
    d = decode_image(png)
    assert d.ext == "jpg" and Image.open(io.BytesIO(d.data)).format == "JPEG"
    low = decode_image(png, output=ImageOutput("jpg", quality=20))
    assert low.ext == "jpg" and len(low.data) < len(d.data)  # the quality flag reaches the encoder
    assert decode_image(png, output=ImageOutput("keep")).data == png
    with pytest.raises(ValueError, match="not one of jpg, keep"):
        ImageOutput("png")
