"""Command-line options that several command groups take, declared once.

`--db` is resolved here, while the command line is parsed (`--db`, else `$BLIP3_DB`, else
`./catalog.duckdb`), so every command receives the catalog path it will use and library code never
guesses it again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _resolve_db(value: Optional[Path]) -> Path:
    from blip3.core.catalog import resolve_db  # duckdb stays out of `blip3 --help`

    return resolve_db(value)


DbOption = typer.Option(None, "--db", callback=_resolve_db,
                        help="Catalog file (default: $BLIP3_DB or ./catalog.duckdb).")
