"""Options that `blip3 ocr` and `blip3 ground` share, declared once: how a job writes its shards."""

from __future__ import annotations

from typing import Literal

import typer

from blip3.core.shards import SHARD_DIGITS
from blip3.datagen.images import DEFAULT_ENCODE_QUALITY

ImageFormat = Literal["jpg", "keep"]
ImageFormatOption = typer.Option(
    "jpg", "--image-format", help="Image members: jpg (every sample .jpg, img2dataset's default) | keep "
                                  "(PNG/WebP inputs stored as they are: mixed member types).")
EncodeQualityOption = typer.Option(DEFAULT_ENCODE_QUALITY, "--encode-quality", min=1, max=95,
                                   help="JPEG quality of re-encoded images.")
ShardNameWidthOption = typer.Option(SHARD_DIGITS, "--shard-name-width", min=1,
                                    help="Digits of shard names (img2dataset's oom_shard_count).")
