"""`blip3 ocr` and `blip3 export blip3-ocr`: thin wrappers over `datagen.ocr` and `datagen.ocr_export`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from blip3.core.options import DbOption, StorageOptions, InputFormat, out_option, output_path
from blip3.datagen.cli_options import (DownloadRetriesOption, DownloadThreadsOption, DownloadTimeoutOption,
                                       EncodeQualityOption, GpusPerWorkerOption, ImageFormat, ImageFormatOption,
                                       InputFormatOption, LimitOption, OverwriteOption, RayAddressOption,
                                       ShardNameWidthOption, ShardSizeOption, SourceOption, WorkersOption, job_options)

def register(app: typer.Typer, export: typer.Typer) -> None:
    """Add this engine's commands to the `blip3` app and its `export` group."""
    app.command("ocr")(ocr)
    export.command("blip3-ocr")(export_blip3_ocr)


def ocr(
    input: str = typer.Argument(..., help="Image folder, WebDataset tars/brace pattern, img2dataset folder, "
                                          "URL list (parquet/csv/tsv/jsonl) or BLIP3-OCR parquet."),
    output: Optional[str] = typer.Argument(None, help="Output folder (the older form of -o/--out)."),
    out: Optional[str] = out_option("output folder for the 00000.tar shards and their sidecars"),
    engine: Literal["rapidocr", "rapidocr-v4", "paddleocr"] = typer.Option("rapidocr", "--engine",
                               help="rapidocr (PP-OCRv6, default) | rapidocr-v4 (needs rapidocr_onnxruntime) | paddleocr"),
    workers: int = WorkersOption,
    ray_address: Optional[str] = RayAddressOption,
    min_confidence: float = typer.Option(0.5, "--min-confidence", help="Drop OCR entries below this confidence."),
    shard_size: int = ShardSizeOption,
    image_format: ImageFormat = ImageFormatOption,
    encode_quality: int = EncodeQualityOption,
    shard_name_width: int = ShardNameWidthOption,
    default_granularity: int = typer.Option(4, "--default-granularity", help="Granularity (0-5) of <key>.txt."),
    input_format: Optional[InputFormat] = InputFormatOption,
    overwrite: bool = OverwriteOption,
    db: Path = DbOption,
    source: Optional[str] = SourceOption,
    lead_in: str = typer.Option("The image contains", "--lead-in", help="Words before the OCR entries."),
    filler: str = typer.Option("the text", "--filler", help='Words before each entry ("" to strip, as the paper does).'),
    drop_empty: bool = typer.Option(False, "--drop-empty", help="Record images without text as failed (no_text) instead of keeping them."),
    paddle_det_dir: Optional[str] = typer.Option(None, "--paddle-det-dir", help="PaddleOCR detection model folder."),
    paddle_rec_dir: Optional[str] = typer.Option(None, "--paddle-rec-dir", help="PaddleOCR recognition model folder."),
    limit: Optional[int] = LimitOption,
    gpus_per_worker: float = GpusPerWorkerOption,
    download_threads: int = DownloadThreadsOption,
    download_timeout: int = DownloadTimeoutOption,
    download_retries: int = DownloadRetriesOption,
    storage_options: Optional[str] = StorageOptions,
) -> None:
    """OCR images into BLIP3-OCR caption shards (12 caption variants each) on Ray; resumable."""
    from rich.markup import escape

    from blip3.core.logs import console
    from blip3.datagen.ocr import run_ocr
    from blip3.datagen.ocr_captions import CaptionStyle

    options = {}
    if engine == "paddleocr":
        options = {k: v for k, v in {"det_dir": paddle_det_dir, "rec_dir": paddle_rec_dir}.items() if v}
    job = job_options(input_format=input_format, workers=workers, ray_address=ray_address, shard_size=shard_size,
                      overwrite=overwrite, db=db, source=source, limit=limit, gpus_per_worker=gpus_per_worker,
                      image_format=image_format, encode_quality=encode_quality, shard_name_width=shard_name_width,
                      storage_options=storage_options, download_threads=download_threads,
                      download_timeout=download_timeout, download_retries=download_retries)
    r = run_ocr(input, output_path(output, out), job, engine=engine, engine_options=options,
                min_confidence=min_confidence, default_granularity=default_granularity,
                style=CaptionStyle(lead_in=lead_in, filler=filler), keep_empty=not drop_empty)
    console.print(f"[green]{r.output}[/]: {escape(r.summary())}", highlight=False)


def export_blip3_ocr(
    output: Path = typer.Argument(..., help="A folder of OCR caption shards (from `blip3 ocr`)."),
    parquet_dir: Optional[Path] = typer.Argument(None, help="Output folder (the older form of -o/--out)."),
    out: Optional[Path] = out_option("folder for parquet files in the published BLIP3-OCR shape"),
    rows_per_file: int = typer.Option(100_000, "--rows-per-file", help="Rows per parquet file."),
) -> None:
    """Export OCR shards to parquet with the published columns: uid, url, captions (JSON), metadata (JSON)."""
    from blip3.core.logs import console
    from blip3.datagen.ocr_export import export_blip3_ocr as run_export

    parquet_dir = output_path(parquet_dir, out)
    files, rows = run_export(output, parquet_dir, rows_per_file=rows_per_file)
    console.print(f"[green]{parquet_dir}[/]: {rows} rows in {len(files)} file(s)", highlight=False)
