"""CLI of `mixture`: `blip3 source ...` (register and import sources) and `blip3 mix ...` (build,
sample, stats, plot).

Heavy imports (torch through the loader, matplotlib) stay inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from blip3.core.options import (DbOption, Format, SourceKind, StorageOptions, local_out_argument, local_out_option,
                                output_path)

TokenizerOption = typer.Option(
    None, "--tokenizer",
    help="Hugging Face tokenizer folder for token counts (default: $BLIP3_TOKENIZER, else an estimate "
         "of UTF-8 bytes / 4, labelled `estimate:utf8-bytes/4` in the catalog).",
)
CropsOption = typer.Option(1, "--crops-per-image", min=1, help="Crops each image costs (x vision tokens per crop).")
VisionTokensOption = typer.Option(
    None, "--vision-tokens-per-crop", min=1,
    help="The model's vision tokens per image crop (its resampler latents: 16 for the tiny model). "
         "Default: the spec's vision_tokens_per_crop, else the released phi3-mini model's 128.",
)

source_app = typer.Typer(help="Register sources (caption, interleaved, sft, dpo shards) in the catalog.",
                         no_args_is_help=True)
mix_app = typer.Typer(help="Weighted interleaved mixtures: build manifests, sample, stats, plots.",
                      no_args_is_help=True)


@source_app.command("add")
def source_add(
    name: str = typer.Argument(..., help="Source name used in mixture specs."),
    path: str = typer.Argument(..., help="Folder of .tar shards (ours or any WebDataset), a glob or a brace pattern; "
                               "local, or s3://... and other fsspec URLs."),
    kind: SourceKind = typer.Option("caption", "--kind", help="The kind of samples the shards hold."),
    tokenizer: Optional[Path] = TokenizerOption,
    crops_per_image: int = CropsOption,
    vision_tokens_per_crop: Optional[int] = VisionTokensOption,
    storage_options: Optional[str] = StorageOptions,
    db: Path = DbOption,
) -> None:
    """Register a source with its shards, checksums, sample and token counts (idempotent)."""
    from blip3.core.catalog import Catalog
    from blip3.core.logs import console
    from blip3.core.storage import parse_storage_options
    from blip3.mixture.sources import add_source
    from blip3.mixture.tokens import DEFAULT_VISION_TOKENS_PER_CROP, TokenCounter

    counter = TokenCounter(tokenizer, crops_per_image=crops_per_image,
                           vision_tokens_per_crop=vision_tokens_per_crop or DEFAULT_VISION_TOKENS_PER_CROP)
    with Catalog(db) as cat:
        r = add_source(cat, name, path, kind, counter, parse_storage_options(storage_options))
    console.print(f"[green]{r.name}[/] ({r.kind}): {r.shards} shard(s), {r.samples} samples, {r.tokens} tokens "
                  f"\\[{r.tokenizer}], {r.added} shard(s) newly added")


@source_app.command("import-obelics")
def source_import_obelics(
    parquet: Path = typer.Argument(..., help="OBELICS-shaped parquet (columns texts, images)."),
    output: Optional[Path] = local_out_argument("output folder"),
    out: Optional[Path] = local_out_option("output folder for interleaved shards"),
    shard_size: int = typer.Option(1000, "--shard-size", min=1, help="Documents per shard."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Folder relative image paths start from "
                                              "(default: the parquet's folder)."),
    source: Optional[str] = typer.Option(None, "--source", help="Also register the output as this source."),
    tokenizer: Optional[Path] = TokenizerOption,
    db: Path = DbOption,
) -> None:
    """Import OBELICS/MINT-1T-shaped parquet (images by path or embedded bytes) as interleaved shards."""
    from blip3.core.logs import console
    from blip3.mixture.obelics import import_obelics

    output = output_path(output, out)
    r = import_obelics(parquet, output, shard_size=shard_size, image_root=image_root)
    console.print(f"{r.documents} document(s) written in {r.shards} shard(s), {r.failed} failed "
                  f"({', '.join(f'{k}: {v}' for k, v in r.reasons.items()) or 'none'})")
    if source:
        source_add(source, str(output), "interleaved", tokenizer, 1, None, None, db)


@source_app.command("tiny")
def source_tiny(
    output: Optional[Path] = local_out_argument("output folder"),
    out: Optional[Path] = local_out_option("folder to write the tiny sources into"),
    shards: int = typer.Option(2, "--shards", min=1, help="Shards per source."),
    per_shard: int = typer.Option(24, "--per-shard", min=1, help="Samples per shard."),
    seed: int = typer.Option(0, "--seed", help="Seed of the generated content."),
) -> None:
    """Write tiny sources of every kind (the data of manifests/tiny-mix.yaml)."""
    from blip3.core.logs import console
    from blip3.mixture.tiny_sources import write_tiny_sources

    for name, folder in write_tiny_sources(output_path(output, out), shards=shards, per_shard=per_shard, seed=seed).items():
        console.print(f"{name}: {folder}")


@mix_app.command("build")
def mix_build(
    spec: Path = typer.Argument(..., help="Mixture spec YAML (docs/formats.md)."),
    out: str = typer.Option(..., "--out", "-o", help="Manifest to write, e.g. manifests/NAME.yaml (or an s3://... URL)."),
    tokenizer: Optional[Path] = TokenizerOption,
    crops_per_image: int = CropsOption,
    vision_tokens_per_crop: Optional[int] = VisionTokensOption,
    verify: Literal["sha256", "size"] = typer.Option(
        "size", "--verify", help="size: check catalogued shards' sizes, trust the sha256 their writer recorded; "
                                 "sha256: re-read every shard to re-hash it."),
    storage_options: Optional[str] = StorageOptions,
    db: Path = DbOption,
) -> None:
    """Resolve a spec into the manifest the trainer reads, and record it in the catalog."""
    from blip3.core.logs import console
    from blip3.core.storage import parse_storage_options
    from blip3.mixture.build import build_manifest

    m = build_manifest(spec, db=db, out=out, tokenizer=tokenizer, crops_per_image=crops_per_image,
                       vision_tokens_per_crop=vision_tokens_per_crop, verify=verify,
                       storage_options=parse_storage_options(storage_options))
    console.print(f"[green]{m.name}[/]: {len(m.sources)} sources, {m.target['samples']} samples, "
                  f"{m.target['tokens']} tokens \\[{m.tokenizer}] -> {out}")
    for s in m.sources:
        console.print(f"  {s.name:<24} {s.kind:<12} weight {s.weight:.4f}  samples {s.target_samples:>10} "
                      f"of {s.samples:<10} epochs {s.epochs:.3f}")


@mix_app.command("sample")
def mix_sample(
    manifest: Path = typer.Argument(..., help="A built manifest."),
    n: int = typer.Option(20, "--samples", "-n", min=1, help="How many samples."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Override the manifest's seed."),
    out: Optional[Path] = local_out_option("file to write JSON lines to (default: stdout)"),
    rank: int = typer.Option(0, "--rank", help="This rank's share of the stream."),
    world_size: int = typer.Option(1, "--world-size", min=1, help="Ranks the stream is split over."),
    shuffle_buffer: int = typer.Option(1000, "--shuffle-buffer", min=1, help="Samples in the shuffle buffer."),
) -> None:
    """The first N samples in loader order, one JSON line each (source, key, kind, epoch, caption, images)."""
    import json
    import sys

    from blip3.mixture.loader import MixtureLoader

    loader = MixtureLoader(manifest, seed=seed, rank=rank, world_size=world_size, shuffle_buffer=shuffle_buffer)
    sink = open(out, "w") if out else sys.stdout
    try:
        for i, s in enumerate(loader.take(n)):
            line = {"index": i, "source": s["source"], "kind": s["kind"], "key": s["key"], "epoch": s["epoch"],
                    "shard": s["shard"], "txt": s["txt"], "images": sorted(s["images"])}
            sink.write(json.dumps(line, ensure_ascii=False) + "\n")
    finally:
        if out:
            sink.close()


@mix_app.command("stats")
def mix_stats(
    name: str = typer.Argument(..., help="Mixture name (as built by `mix build`)."),
    fmt: Format = typer.Option(
        "table", "--format", "-f", help="Output format (parquet needs --out FOLDER: one file per table)."),
    out: Optional[Path] = local_out_option("file to write instead of printing (a folder for parquet)"),
    db: Path = DbOption,
) -> None:
    """Per-source weights (target vs realised), tokens, epochs, coverage, caption lengths, failures."""
    import re

    from blip3.core.errors import UserError
    from blip3.core.tables import render_text, save, write_result
    from blip3.mixture.stats import mixture_stats

    tables = mixture_stats(name, db)
    if fmt == "parquet":
        if out is None:
            raise UserError("parquet output needs --out FOLDER (one file per table)", field="--out")
        out.mkdir(parents=True, exist_ok=True)
        for title, table in tables.items():
            write_result(table, fmt, out / f"{re.sub(r'[^a-z0-9]+', '_', title.lower()).strip('_')}.parquet")
        return
    heading = (lambda title: "") if fmt == "table" else (lambda title: f"# {title}\n")
    if out is not None:
        save(out, "".join(heading(t) + render_text(table, fmt, t) for t, table in tables.items()).encode())
        return
    for title, table in tables.items():
        print(heading(title), end="")
        write_result(table, fmt=fmt, title=title)


@mix_app.command("plot")
def mix_plot(
    name: str = typer.Argument(..., help="Mixture name."),
    out: Path = local_out_option("PNG file", default=...),
    db: Path = DbOption,
) -> None:
    """Composition (target vs realised shares) and token budget per source, as one PNG."""
    from blip3.core.logs import console
    from blip3.mixture.plots import plot_mixture

    plot_mixture(name, out, db=db)
    console.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add `source` and `mix` to the `blip3` app."""
    app.add_typer(source_app, name="source")
    app.add_typer(mix_app, name="mix")
