"""Options that `blip3 ocr` and `blip3 ground` share, declared once (each command's parameter
takes its default and help from here): how a job reads, runs and writes its shards, and the one
conversion of the command line into `datagen.pipeline.JobOptions`."""

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
InputFormatOption = typer.Option(None, "--input-format",
                                 help="folder | webdataset | img2dataset | urls | blip3-ocr (default: detect).")
WorkersOption = typer.Option(2, "--workers", help="Annotation actors (each loads the model once).")
GpusPerWorkerOption = typer.Option(0.0, "--gpus-per-worker", help="GPUs per annotation actor (0: CPU).")
RayAddressOption = typer.Option(None, "--ray-address", help="Join this Ray cluster instead of starting a local one.")
ShardSizeOption = typer.Option(1000, "--shard-size", help="Input samples per shard.")
LimitOption = typer.Option(None, "--limit", help="Only the first N input samples.")
OverwriteOption = typer.Option(False, "--overwrite", help="Redo every shard (default: skip finished ones).")
SourceOption = typer.Option(None, "--source", help="Catalog source name (default: the output folder name).")
DownloadThreadsOption = typer.Option(16, "--download-threads", help="URL inputs: concurrent downloads per shard task.")
DownloadTimeoutOption = typer.Option(10, "--download-timeout", help="URL inputs: seconds per request.")
DownloadRetriesOption = typer.Option(2, "--download-retries", help="URL inputs: further attempts after a failed request.")


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
