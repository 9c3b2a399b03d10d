"""Command-line options that several command groups take, declared once.

`--db` is resolved here, while the command line is parsed (`--db`, else `$BLIP3_DB`, else
`./catalog.duckdb`), so every command receives the catalog path it will use and library code never
guesses it again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer


def _resolve_db(value: Optional[Path]) -> Path:
    from blip3.core.catalog import resolve_db  # duckdb stays out of `blip3 --help`

    return resolve_db(value)


DbOption = typer.Option(None, "--db", callback=_resolve_db,
                        help="Catalog file (default: $BLIP3_DB or ./catalog.duckdb).")

#: The formats every table command writes (`core.tables.write_result`).
Format = Literal["table", "csv", "json", "parquet"]
FormatOption = typer.Option("table", "--format", "-f", help="Output format (parquet needs --out).")
OutOption = typer.Option(None, "--out", "-o", help="Write the result to this file instead of printing it.")
