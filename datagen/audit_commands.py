"""`blip3 audit SHARDS -o DIR`: a contact sheet and histograms of caption shards (datagen/audit.py)."""

from __future__ import annotations

import typer


def audit(
    shards: str = typer.Argument(..., help="Caption shards: a folder, a .tar, a glob or a brace pattern."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder (index.html, images/, *.png); local, or "
                            "s3://... and other fsspec URLs."),
    n: int = typer.Option(48, "--samples", "-n", min=1, help="Images on the contact sheet."),
    seed: int = typer.Option(0, "--seed", help="Seed of the reservoir sample."),
) -> None:
    """HTML contact sheet of sampled images with OCR and object boxes and captions, plus histograms."""
    from blip3.core.logs import console
    from blip3.datagen.audit import write_audit

    r = write_audit(shards, out, n=n, seed=seed)
    console.print(f"{r.shown} of {r.scanned} samples on {r.html}; histograms: {', '.join(p.name for p in r.plots)}")


def register(app: typer.Typer) -> None:
    """Add `audit` to the `blip3` app."""
    app.command("audit")(audit)
