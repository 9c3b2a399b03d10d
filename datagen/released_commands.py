"""`blip3 import-released`: a thin wrapper over `datagen.released.import_released`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from blip3.core.options import out_option, output_path


def import_released(
    kind: str = typer.Argument(..., help="blip3-ocr | blip3-grounding | blip3-kale | vlfeedback | vlguard"),
    rows: Path = typer.Argument(..., help="The released rows: .parquet, .jsonl or .json in the published layout."),
    output: Optional[str] = typer.Argument(None, help="Output folder (the older form of -o/--out)."),
    out: Optional[str] = out_option("empty folder for the shards (local, or s3://... and other fsspec URLs)"),
    images: Path = typer.Option(..., "--images", help="Folder of the rows' images (<id>.<ext>, or the rows' own "
                                "relative paths for vlfeedback / vlguard)."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Rows per shard."),
) -> None:
    """Released dataset rows -> shards that keep their captions, pairs or conversations (no re-OCR)."""
    from blip3.core.logs import console
    from blip3.datagen.released import SOURCE_KIND
    from blip3.datagen.released import import_released as run

    output = output_path(output, out)
    r = run(kind, rows, images, output, shard_size=shard_size)
    failed = ", ".join(f"{k} {v}" for k, v in sorted(r.failed.items())) or "none"
    console.print(f"[green]{output}[/]: {r.samples} sample(s) in {r.shards} shard(s); failed: {failed}. "
                  f"Register with `blip3 source add NAME {output} --kind {SOURCE_KIND.get(kind, '?')}`", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("import-released")(import_released)
