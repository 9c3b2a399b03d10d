"""Data-generation commands: `blip3 ocr`, `blip3 ground`, `blip3 export`, `blip3 retemplate`, ..."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from datagen import ground_commands, ocr_commands

    ocr_commands.register(app)
    ground_commands.register(app)
