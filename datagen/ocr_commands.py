"""CLI commands of the ocr engine."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this engine's commands to the `blip3` app."""
