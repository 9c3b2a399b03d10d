"""Command groups shared by several datagen engines (`blip3 export ...`), created once.

Each engine's `register(app)` calls `export_group(app)` and adds its own subcommand to it, so
`blip3 export blip3-ocr` and `blip3 export blip3-grounding` live in one group whatever the order
of registration.
"""

from __future__ import annotations

import typer

_EXPORT: dict[int, typer.Typer] = {}


def export_group(app: typer.Typer) -> typer.Typer:
    """The `blip3 export` sub-app of `app`, added on first use."""
    if id(app) not in _EXPORT:
        group = typer.Typer(help="Export caption shards to the published datasets' parquet shapes.",
                            no_args_is_help=True)
        app.add_typer(group, name="export")
        _EXPORT[id(app)] = group
    return _EXPORT[id(app)]
