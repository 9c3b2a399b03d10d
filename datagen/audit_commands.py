"""`blip3 audit SHARDS -o DIR`: a contact sheet and histograms of caption shards (datagen/audit.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from blip3.core.options import DbOption


def audit(
    shards: str = typer.Argument(..., help="Caption shards: a folder, a .tar, a glob or a brace pattern."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (index.html, images/, *.png)."),
    n: int = typer.Option(48, "--samples", "-n", min=1, help="Images on the contact sheet."),
    seed: int = typer.Option(0, "--seed", help="Seed of the reservoir sample."),
    db: Path = DbOption,
) -> None:
    """HTML contact sheet of sampled images with OCR and object boxes and captions, plus histograms; with
    `blip3 curate` decisions in the catalog, duplicate clusters side by side and dropped samples with their reason."""
    from blip3.core.logs import console
    from blip3.datagen.audit import write_audit

    r = write_audit(shards, out, n=n, seed=seed, db=db)
    console.print(f"{r.shown} of {r.scanned} samples on {r.html}; histograms: {', '.join(p.name for p in r.plots)}")


def register(app: typer.Typer) -> None:
    """Add `audit` to the `blip3` app."""
    app.command("audit")(audit)
