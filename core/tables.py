"""Print and save tabular results (Arrow/polars) as a rich table, CSV, JSON or parquet."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from blip3.core.errors import ENVIRONMENT_ERRNOS, UserError

FORMATS = ("table", "csv", "json", "parquet")


def to_arrow(data) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if hasattr(data, "to_arrow"):  # polars
        return data.to_arrow()
    raise TypeError(f"cannot tabulate {type(data)!r}")


def rich_table(data, title: str | None = None, max_rows: int = 200) -> Table:
    t = to_arrow(data)
    table = Table(title=title, show_lines=False, header_style="bold cyan")
    for name in t.column_names:
        table.add_column(name, overflow="fold")
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


def write_result(data, fmt: str = "table", out: str | Path | None = None, title: str | None = None) -> None:
    """Print `data` as a table, or write it as csv/json/parquet to `out` (stdout for csv/json)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}", field="--format")
    if out is not None and not Path(out).parent.is_dir():
        raise UserError("the folder to write into does not exist", file=out, field="--out")
    t = to_arrow(data)
    if fmt == "table":
        console = Console(record=out is not None, width=200 if out else None)
        console.print(rich_table(t, title=title))
        if out:
            _save(out, console.export_text().encode())
        return
    if fmt == "parquet":
        if not out:
            raise UserError("parquet output needs --out FILE", field="--out")
        sink = pa.BufferOutputStream()
        pq.write_table(t, sink)
        _save(out, sink.getvalue().to_pybytes())
        return
    if fmt == "csv":
        nested = [f"{f.name} ({f.type})" for f in t.schema if pa.types.is_nested(f.type)]
        if nested:
            raise UserError(f"CSV cannot hold nested columns: {', '.join(nested)}; use --format json or parquet, "
                            "or flatten them in the query (e.g. to_json(col), unnest(col))", field="--format")
        sink = pa.BufferOutputStream()
        pacsv.write_csv(t, sink)
        text = sink.getvalue().to_pybytes().decode()
    else:
        text = "\n".join(json.dumps(r, default=str, ensure_ascii=False) for r in t.to_pylist()) + "\n"
    if out:
        _save(out, text.encode())
    else:
        print(text, end="")


def _save(out: str | Path, data: bytes) -> None:
    """Write a result file; a full disk or an unwritable path is the user's to fix (one line)."""
    try:
        Path(out).write_bytes(data)
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        raise UserError(ENVIRONMENT_ERRNOS[e.errno], file=out, field="--out") from None
