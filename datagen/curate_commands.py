"""`blip3 curate`: filters, deduplication and benchmark decontamination over catalogued shards
(datagen/curate.py), recorded per sample in the catalog."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from blip3.core.options import DbOption


def curate(
    source: list[str] = typer.Option([], "--source", "-s", help="A catalogued source (repeat; default: every source)."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="The `blip3 eval --data` folder: flag training "
                                             "images that are also benchmark images (decontamination)."),
    clip_model: Optional[Path] = typer.Option(None, "--clip-model", help="Local open_clip folder for the CLIP score "
                                              "(else $BLIP3_CLIP_MODEL when --clip is given)."),
    clip: bool = typer.Option(False, "--clip", help="Compute the CLIP score (weights from $BLIP3_CLIP_MODEL)."),
    sem_dedup: bool = typer.Option(False, "--sem-dedup", help="Semantic dedup over the CLIP image embeddings."),
    sem_threshold: float = typer.Option(0.95, "--sem-threshold", min=0.0, max=1.0,
                                        help="Cosine similarity that makes a semantic duplicate (1 - SemDeDup's eps)."),
    text_presence: bool = typer.Option(False, "--text-presence", help="Count text lines with the OCR detector alone."),
    near_dup_bits: int = typer.Option(4, "--near-dup-bits", min=0, max=16,
                                      help="Largest pHash Hamming distance of a near duplicate."),
    threshold: list[str] = typer.Option([], "--threshold", "-t", help="RULE=VALUE or RULE=off (repeat), e.g. "
                                        "min_side=384, clip=0.3, blur=off; docs/curation.md lists the rules."),
    language: list[str] = typer.Option([], "--language", help="Caption languages kept (ISO 639-1, repeat; default en)."),
    no_language: bool = typer.Option(False, "--no-language", help="Do not identify caption languages."),
    work: Optional[Path] = typer.Option(None, "--work", help="Folder of the run's per-sample parquet "
                                        "(default: curation/ beside the catalog)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster (default: a local one)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="CPUs of the local Ray cluster."),
    actors: int = typer.Option(1, "--actors", min=1, help="Model actors (CLIP, OCR detector), each with its model."),
    gpus_per_actor: float = typer.Option(0.0, "--gpus-per-actor", min=0.0,
                                         help="GPUs each CLIP actor asks Ray for (0: CPU)."),
    db: Path = DbOption,
) -> None:
    """Score, deduplicate and decontaminate catalogued samples; decisions go to the catalog, never into the shards."""
    from blip3.core.logs import console
    from blip3.datagen.curate import CurateOptions, run_curation
    from blip3.datagen.curate_rules import DEFAULT_LANGUAGES, parse_thresholds

    opts = CurateOptions(
        sources=list(source), work=work, eval_data=eval_data,
        clip_model=clip_model,
        thresholds=parse_thresholds(threshold),
        languages=None if no_language else tuple(language) or DEFAULT_LANGUAGES,
        near_dup_bits=near_dup_bits, text_presence=text_presence, sem_dedup=sem_dedup, sem_threshold=sem_threshold,
        ray_address=ray_address, num_cpus=workers, actors=actors,
        gpus_per_actor=gpus_per_actor)
    if (clip or sem_dedup) and clip_model is None:
        from blip3.datagen.tags_clip import resolve_clip_model

        opts.clip_model = resolve_clip_model(None, "--clip")
    result = run_curation(db, opts)
    console.print(result.summary(), highlight=False, soft_wrap=True)
    for task, why in sorted(result.benchmark_skipped.items()):
        console.print(f"[yellow]benchmark not checked:[/] {task}: {why}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `curate` to the `blip3` app."""
    app.command("curate")(curate)
