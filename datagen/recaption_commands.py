"""`blip3 recaption`: a thin wrapper over `datagen.recaption`.

Settings come from the options, else the `--config` YAML file, else the defaults: an option given
on the command line wins over the file.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Literal, Optional

import typer

from blip3.core.options import DbOption, InputFormat, StorageOptions, out_option, output_path
from blip3.datagen.cli_options import (DownloadRetriesOption, DownloadThreadsOption, DownloadTimeoutOption,
                                       EncodeQualityOption, GpusPerWorkerOption, ImageFormat, ImageFormatOption,
                                       InputFormatOption, LimitOption, OverwriteOption, RayAddressOption,
                                       ShardNameWidthOption, ShardSizeOption, SourceOption, WorkersOption, job_options)


def recaption(
    input: str = typer.Argument(..., help="Images: folder, WebDataset shards, img2dataset output or a URL list "
                                          "(same kinds as `blip3 ocr`); the alt-text is each image's source caption."),
    output: Optional[str] = typer.Argument(None, help="Output folder (the older form of -o/--out)."),
    out: Optional[str] = out_option("output folder for the 00000.tar shards and their sidecars"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML settings file (backend, vlm, llm); options win."),
    vlm: Optional[str] = typer.Option(None, "--vlm", "--model", help="Captioning VLM: a local Hugging Face "
                                      "image-text-to-text model or a blip3 model/stage dir (else $BLIP3_RECAPTION_VLM)."),
    llm: Optional[str] = typer.Option(None, "--llm", help="Merge LLM: a local causal LM (else $BLIP3_RECAPTION_LLM)."),
    no_llm: bool = typer.Option(False, "--no-llm", help="Dense captions only: no merge with the alt-text."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="VLM prompt (default: docs/captions.md; a blip3 model: its caption format)."),
    merge_prompt: Optional[str] = typer.Option(None, "--merge-prompt",
                                               help="LLM prompt with {dense_caption} and {alt_text} (default: docs/captions.md)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="VLM: tokens per caption at most (128)."),
    merge_max_new_tokens: Optional[int] = typer.Option(None, "--merge-max-new-tokens", help="LLM: tokens at most (128)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="VLM: images per generate call (8)."),
    merge_batch_size: Optional[int] = typer.Option(None, "--merge-batch-size", help="LLM: prompts per generate call (8)."),
    sample: Optional[bool] = typer.Option(None, "--sample/--greedy", help="Sampling or greedy decoding, both stages (greedy)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature, both stages (1.0)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Sampling nucleus, both stages (1.0)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed, both stages (0)."),
    backend: Optional[Literal["transformers", "vllm"]] = typer.Option(None, "--backend",
                                                                      help="transformers (default) | vllm (GPU nodes)."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device (default: cuda with --gpus-per-worker, else cpu)."),
    workers: int = WorkersOption,
    gpus_per_worker: float = GpusPerWorkerOption,
    ray_address: Optional[str] = RayAddressOption,
    shard_size: int = ShardSizeOption,
    image_format: ImageFormat = ImageFormatOption,
    encode_quality: int = EncodeQualityOption,
    shard_name_width: int = ShardNameWidthOption,
    input_format: Optional[InputFormat] = InputFormatOption,
    limit: Optional[int] = LimitOption,
    overwrite: bool = OverwriteOption,
    source: Optional[str] = SourceOption,
    db: Path = DbOption,
    download_threads: int = DownloadThreadsOption,
    download_timeout: int = DownloadTimeoutOption,
    download_retries: int = DownloadRetriesOption,
    storage_options: Optional[str] = StorageOptions,
) -> None:
    """Dense captions from a VLM, merged with each image's alt-text by an LLM (BLIP3-KALE style)."""
    from rich.markup import escape

    from blip3.core.logs import console
    from blip3.datagen.recaption import make_config, read_settings
    from blip3.datagen.recaption import recaption as run_recaption
    from blip3.datagen.recaption_models import GenerationSettings
    from blip3.datagen.recaption_prompts import DEFAULT_MERGE_PROMPT

    file = read_settings(config) if config is not None else {}
    vlm_file, llm_file = dict(file.get("vlm") or {}), dict(file.get("llm") or {})
    shared = {"do_sample": sample, "temperature": temperature, "top_p": top_p, "seed": seed}

    def settings(section: dict[str, Any], **given: Any) -> GenerationSettings:
        names = {f.name for f in fields(GenerationSettings)}
        base = GenerationSettings(**{k: v for k, v in section.items() if k in names})
        return replace(base, **{k: v for k, v in {**shared, **given}.items() if v is not None})

    cfg = make_config(
        vlm=vlm or vlm_file.get("model"),
        llm=llm or llm_file.get("model"),
        use_llm=not no_llm and file.get("llm", {}) is not None,
        prompt=prompt if prompt is not None else vlm_file.get("prompt"),
        merge_prompt=merge_prompt if merge_prompt is not None else llm_file.get("prompt", DEFAULT_MERGE_PROMPT),
        vlm_generation=settings(vlm_file, max_new_tokens=max_new_tokens, batch_size=batch_size),
        llm_generation=settings(llm_file, max_new_tokens=merge_max_new_tokens, batch_size=merge_batch_size),
        backend=backend or file.get("backend", "transformers"),
        device=device or file.get("device") or ("cuda" if gpus_per_worker > 0 else "cpu"),
    )
    job = job_options(input_format=input_format, workers=workers, ray_address=ray_address, shard_size=shard_size,
                      overwrite=overwrite, db=db, source=source, limit=limit, gpus_per_worker=gpus_per_worker,
                      image_format=image_format, encode_quality=encode_quality, shard_name_width=shard_name_width,
                      storage_options=storage_options, download_threads=download_threads,
                      download_timeout=download_timeout, download_retries=download_retries)
    r = run_recaption(input, output_path(output, out), cfg, job)
    console.print(f"[green]{r.output}[/]: {escape(r.summary())}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `recaption` to the `blip3` app."""
    app.command("recaption")(recaption)
