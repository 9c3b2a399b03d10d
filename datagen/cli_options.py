"""Options that `blip3 ocr` and `blip3 ground` share, declared once: how a job writes its shards,
and the one conversion of the command line into `datagen.pipeline.JobOptions`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import typer

from blip3.core.shards import SHARD_DIGITS
from blip3.datagen.images import DEFAULT_ENCODE_QUALITY

if TYPE_CHECKING:
    from blip3.datagen.pipeline import JobOptions

ImageFormat = Literal["jpg", "keep"]
ImageFormatOption = typer.Option(
    "jpg", "--image-format", help="Image members: jpg (every sample .jpg, img2dataset's default) | keep "
                                  "(PNG/WebP inputs stored as they are: mixed member types).")
EncodeQualityOption = typer.Option(DEFAULT_ENCODE_QUALITY, "--encode-quality", min=1, max=95,
                                   help="JPEG quality of re-encoded images.")
ShardNameWidthOption = typer.Option(SHARD_DIGITS, "--shard-name-width", min=1,
                                    help="Digits of shard names (img2dataset's oom_shard_count).")


def job_options(*, image_format: ImageFormat, encode_quality: int, storage_options: str | None,
                download_threads: int, download_timeout: int, download_retries: int, **job: Any) -> JobOptions:
    """The command line's job settings as the one `JobOptions` (the rest of `job` keeps its names):
    the image, storage and download flags become their objects here, once for both commands."""
    from blip3.core.storage import parse_storage_options
    from blip3.datagen.fetch import DownloadOptions
    from blip3.datagen.images import ImageOutput
    from blip3.datagen.pipeline import JobOptions

    return JobOptions(image_output=ImageOutput(image_format, encode_quality),
                      storage_options=parse_storage_options(storage_options),
                      download=DownloadOptions(download_threads, download_timeout, download_retries), **job)
