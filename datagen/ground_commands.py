"""CLI commands of the grounding engine: `blip3 ground` and `blip3 retemplate`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from blip3.core.options import DbOption, StorageOptions, InputFormat, out_option, output_path
from blip3.datagen.cli_options import (DownloadRetriesOption, DownloadThreadsOption, DownloadTimeoutOption,
                                       EncodeQualityOption, GpusPerWorkerOption, ImageFormat, ImageFormatOption,
                                       InputFormatOption, LimitOption, OverwriteOption, RayAddressOption,
                                       ShardNameWidthOption, ShardSizeOption, SourceOption, WorkersOption, job_options)
from blip3.datagen.detectors import DetectionLimits

_LIMITS = DetectionLimits()  # the options' defaults are the library's


def ground(
    input: str = typer.Argument(..., help="Images: folder, WebDataset shards (brace patterns ok), img2dataset "
                                          "output, or a parquet/CSV/JSONL of URLs (same kinds as `blip3 ocr`)."),
    output: Optional[str] = typer.Argument(None, help="Output folder (the older form of -o/--out)."),
    out: Optional[str] = out_option("output folder for the 00000.tar shards and their sidecars"),
    detector: Literal["grounding-dino", "groundingdino-py", "annotations"] = typer.Option("grounding-dino", "--detector",
                                 help="grounding-dino (transformers) | groundingdino-py | annotations"),
    tags: Literal["caption", "vocab", "clip"] = typer.Option("caption", "--tags", help="caption (noun phrases) | vocab | clip (open_clip zero-shot); "
                             "not used with --detector annotations (labels come from the file)"),
    vocab: Optional[Path] = typer.Option(None, "--vocab", help="Vocabulary file, one tag per line (vocab, clip)."),
    annotations: Optional[Path] = typer.Option(None, "--annotations", help="COCO or Visual Genome box JSON."),
    include_crowd: bool = typer.Option(False, "--include-crowd", help="Keep COCO iscrowd boxes (skipped by default)."),
    drop_empty: bool = typer.Option(False, "--drop-empty", help="Record images with no object as failed "
                                    "(no_objects) instead of keeping them with an empty object list."),
    model: Optional[Path] = typer.Option(None, "--model", help="Grounding DINO dir (else $BLIP3_GROUNDING_DINO, "
                                         "else the HF cache); groundingdino-py: the checkpoint file."),
    gdino_config: Optional[Path] = typer.Option(None, "--gdino-config", help="groundingdino-py config .py file."),
    clip_model: Optional[Path] = typer.Option(None, "--clip-model", help="Local open_clip dir for --tags clip "
                                              "(else $BLIP3_CLIP_MODEL)."),
    clip_top_k: int = typer.Option(8, "--clip-top-k", help="Tags per image with --tags clip."),
    box_threshold: float = typer.Option(_LIMITS.box_threshold, "--box-threshold", help="Min box confidence."),
    text_threshold: float = typer.Option(_LIMITS.text_threshold, "--text-threshold", help="Min tag-token confidence."),
    nms_iou: float = typer.Option(_LIMITS.nms_iou, "--nms-iou", help="Per-label NMS IoU (detectors only)."),
    min_area: float = typer.Option(_LIMITS.min_area, "--min-area", help="Min box area as a fraction of the image."),
    max_objects: int = typer.Option(_LIMITS.max_objects, "--max-objects", help="Keep at most N objects (highest scores)."),
    caption_format: Literal["positional", "textual", "bbox"] = typer.Option("positional", "--caption-format", help="Format of the .txt caption."),
    caption_style: Optional[Literal["inline", "tags"]] = typer.Option(
        None, "--caption-style", help="Style of the .txt caption (default inline when a caption exists)."),
    tag_order: Literal["detector", "reading"] = typer.Option("detector", "--tag-order", help="Tag-list order: detector (the paper's form: "
                                  "detector order, no final period) | reading (by position, ending in a period)"),
    input_format: Optional[InputFormat] = InputFormatOption,
    workers: int = WorkersOption,
    gpus_per_worker: float = GpusPerWorkerOption,
    ray_address: Optional[str] = RayAddressOption,
    shard_size: int = ShardSizeOption,
    image_format: ImageFormat = ImageFormatOption,
    encode_quality: int = EncodeQualityOption,
    shard_name_width: int = ShardNameWidthOption,
    limit: Optional[int] = LimitOption,
    overwrite: bool = OverwriteOption,
    source: Optional[str] = SourceOption,
    db: Path = DbOption,
    download_threads: int = DownloadThreadsOption,
    download_timeout: int = DownloadTimeoutOption,
    download_retries: int = DownloadRetriesOption,
    storage_options: Optional[str] = StorageOptions,
) -> None:
    """Detect objects and write BLIP3-GROUNDING caption shards (positional, textual, bbox)."""
    from rich.markup import escape

    from blip3.core.logs import console
    from blip3.datagen.grounding import ground as run_ground
    from blip3.datagen.grounding import make_config

    config = make_config(
        detector=detector, tags=tags, vocab=vocab, model=model, gdino_config=gdino_config,
        annotations=annotations, include_crowd=include_crowd, drop_empty=drop_empty, clip_model=clip_model,
        clip_top_k=clip_top_k,
        limits=DetectionLimits(box_threshold, text_threshold, nms_iou, min_area, max_objects),
        caption_format=caption_format, caption_style=caption_style, tag_order=tag_order,
    )
    job = job_options(input_format=input_format, workers=workers, ray_address=ray_address, shard_size=shard_size,
                      overwrite=overwrite, db=db, source=source, limit=limit, gpus_per_worker=gpus_per_worker,
                      image_format=image_format, encode_quality=encode_quality, shard_name_width=shard_name_width,
                      storage_options=storage_options, download_threads=download_threads,
                      download_timeout=download_timeout, download_retries=download_retries)
    r = run_ground(input, output_path(output, out), config, job)
    console.print(f"[green]{r.output}[/]: {escape(r.summary(skipped_as='skipped'))}", highlight=False)


def retemplate(
    input_dir: Path = typer.Argument(..., help="Folder of grounding shards."),
    output_dir: Optional[Path] = typer.Argument(None, help="Output folder (the older form of -o/--out)."),
    out: Optional[Path] = out_option("folder for the re-captioned shards (must differ from the input)"),
    caption_format: Literal["positional", "textual", "bbox"] = typer.Option("positional", "--caption-format", help="Format of the .txt caption."),
    caption_style: Optional[Literal["inline", "tags"]] = typer.Option(None, "--caption-style", help="Style of the .txt caption (default inline when a caption exists)."),
    lead_in: Optional[str] = typer.Option(None, "--lead-in", help='Tag-list lead-in (default "The image contains").'),
    also_lead_in: Optional[str] = typer.Option(None, "--also-lead-in",
                                               help='Lead-in for objects not found in the caption.'),
    tag_order: Literal["detector", "reading"] = typer.Option("detector", "--tag-order", help="Tag-list order: detector (the paper's form: "
                                  "detector order, no final period) | reading (by position, ending in a period)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Rewrite shards already retemplated."),
    source: Optional[str] = typer.Option(None, "--source", help="Catalog source name (default: output folder name)."),
    db: Optional[Path] = typer.Option(None, "--db", help="Catalog file (default: $BLIP3_DB or ./catalog.duckdb)."),
) -> None:
    """Rebuild grounding captions from the objects stored in existing shards (no re-detection), and
    register the new shards in the catalog."""
    from blip3.core.logs import console
    from blip3.datagen.grounding_captions import DEFAULT_ALSO_LEAD_IN, DEFAULT_LEAD_IN
    from blip3.datagen.retemplate import TemplateOptions
    from blip3.datagen.retemplate import retemplate as run_retemplate

    opts = TemplateOptions(caption_format, caption_style, DEFAULT_LEAD_IN if lead_in is None else lead_in,
                           DEFAULT_ALSO_LEAD_IN if also_lead_in is None else also_lead_in, tag_order)
    output_dir = output_path(output_dir, out)
    r = run_retemplate(input_dir, output_dir, opts, overwrite=overwrite, db=db, source=source)
    console.print(f"[green]{output_dir}[/]: {r.shards_written} shard(s) rewritten ({r.samples} rows), "
                  f"{r.shards_skipped} already done; catalog source {r.source}")


def register(app: typer.Typer) -> None:
    """Add this engine's commands to the `blip3` app."""
    app.command("ground")(ground)
    app.command("retemplate")(retemplate)
