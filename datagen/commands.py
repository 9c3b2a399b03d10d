"""Data-generation commands: `blip3 ocr`, `blip3 ground`, `blip3 recaption`, `blip3 export`, `blip3 retemplate`, ..."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the engines' commands; the `blip3 export` group is made here, once, and each engine
    that exports adds its own subcommand to it."""
    from blip3.datagen import (audit_commands, curate_commands, ground_commands, ocr_commands, recaption_commands,
                               released_commands)

    export = typer.Typer(help="Export caption shards to the published datasets' parquet shapes.", no_args_is_help=True)
    app.add_typer(export, name="export")
    ocr_commands.register(app, export)
    ground_commands.register(app)
    recaption_commands.register(app)
    released_commands.register(app)
    audit_commands.register(app)
    curate_commands.register(app)
