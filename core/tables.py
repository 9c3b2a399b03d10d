"""Print and save tabular results (Arrow/polars) as a rich table, CSV, JSON or parquet.

Every command that prints a table takes `--format` (`FormatOption`) and `--out`. A table printed
to a pipe or file is never folded: one line per row, so `grep` and `wc -l` work on it; in a
terminal long cells fold to the window.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import get_args

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from blip3.core.errors import ENVIRONMENT_ERRNOS, UserError
from blip3.core.storage import output_location
from blip3.core.options import Format

FORMATS = get_args(Format)
#: Width of a table written to a pipe or a file: wide enough that no row wraps.
UNFOLDED_WIDTH = 100_000


def to_arrow(data) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if hasattr(data, "to_arrow"):  # polars
        return data.to_arrow()
    raise TypeError(f"cannot tabulate {type(data)!r}")


def rich_table(data, title: str | None = None, max_rows: int = 200, fold: bool = True) -> Table:
    """`data` as a rich table; `fold=False` keeps every cell on its row's line."""
    t = to_arrow(data)
    table = Table(title=title, show_lines=False, header_style="bold cyan")
    for name in t.column_names:
        table.add_column(name, overflow="fold", no_wrap=not fold)
    for row in t.slice(0, max_rows).to_pylist():
        table.add_row(*(format_cell(v) for v in row.values()))
    if t.num_rows > max_rows:
        table.caption = f"{max_rows} of {t.num_rows} rows shown (use --format csv/json/parquet --out FILE for all)"
    return table


def format_cell(v) -> str:
    """How a value reads in a table: empty for NULL, floats to 4 significant digits."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render_text(data, fmt: str, title: str | None = None) -> str:
    """`data` as the text of a file: an unfolded table (one line per row), CSV, or JSON lines."""
    t = to_arrow(data)
    if fmt == "table":
        console = Console(file=io.StringIO(), width=UNFOLDED_WIDTH, record=True)
        console.print(rich_table(t, title=title, fold=False))
        return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"
    if fmt == "csv":
        nested = [f"{f.name} ({f.type})" for f in t.schema if pa.types.is_nested(f.type)]
        if nested:
            raise UserError(f"CSV cannot hold nested columns: {', '.join(nested)}; use --format json or parquet, "
                            "or flatten them in the query (e.g. to_json(col), unnest(col))", field="--format")
        sink = pa.BufferOutputStream()
        pacsv.write_csv(t, sink)
        return sink.getvalue().to_pybytes().decode()
    return "\n".join(json.dumps(r, default=str, ensure_ascii=False) for r in t.to_pylist()) + "\n"


def write_result(data, fmt: str = "table", out: str | Path | None = None, title: str | None = None) -> None:
    """Print `data` as a table/csv/json, or write it in `fmt` to `out` (then nothing is printed)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}", field="--format")
    if out is not None:
        where = output_location(out, field="--out")  # a URL is written there, never to ./s3:/...
        if where.is_local and not where.local_path.parent.is_dir():
            raise UserError("the folder to write into does not exist", file=out, field="--out")
    if fmt == "parquet":
        if not out:
            raise UserError("parquet output needs --out FILE", field="--out")
        sink = pa.BufferOutputStream()
        pq.write_table(to_arrow(data), sink)
        save(out, sink.getvalue().to_pybytes())
        return
    if out:
        save(out, render_text(data, fmt, title).encode())
        return
    console = Console()
    if fmt == "table" and console.is_terminal:
        console.print(rich_table(data, title=title))  # long cells fold to the window
    else:
        print(render_text(data, fmt, title), end="")


def save(out: str | Path, data: bytes) -> None:
    """Write a result file; a full disk or an unwritable path is the user's to fix (one line)."""
    try:
        output_location(out, field="--out").write_bytes(data)
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        raise UserError(ENVIRONMENT_ERRNOS[e.errno], file=out, field="--out") from None
