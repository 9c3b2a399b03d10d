"""Command-line options that several command groups take, declared once.

`--db` is resolved here, while the command line is parsed (`--db`, else `$BLIP3_DB`, else
`./catalog.duckdb`), so every command receives the catalog path it will use and library code never
guesses it again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from blip3.core.records import RECORD_KINDS


def _resolve_db(value: Optional[Path]) -> Path:
    from blip3.core.catalog import resolve_db  # duckdb stays out of `blip3 --help`

    return resolve_db(value)


DbOption = typer.Option(None, "--db", callback=_resolve_db,
                        help="Catalog file (default: $BLIP3_DB or ./catalog.duckdb).")

#: The formats every table command writes (`core.tables.write_result`).
Format = Literal["table", "csv", "json", "parquet"]
FormatOption = typer.Option("table", "--format", "-f", help="Output format (parquet needs --out).")
OutOption = typer.Option(None, "--out", "-o", help="Write the result to this file instead of printing it.")


def output_path(positional, option, what: str = "output folder"):
    """A command's output: `-o/--out` (the one convention of every command), or the positional
    form older scripts use; both given must agree, one of them is required."""
    from blip3.core.errors import UserError

    if positional is not None and option is not None and str(positional) != str(option):
        raise UserError(f"the {what} is given twice ({positional} and {option}); pass it once, as -o/--out",
                        field="--out")
    value = option if option is not None else positional
    if value is None:
        raise UserError(f"missing the {what}: pass -o/--out", field="--out")
    return value


def out_option(what: str):
    """`-o/--out`, for a command whose output was a positional argument (kept, now optional); the
    command passes it to `core.storage.output_location` (any fsspec URL)."""
    return typer.Option(None, "--out", "-o", help=f"{what[0].upper()}{what[1:]} (or as the positional argument).")


def local_output_path(text: str):
    """The parser of an output that must be local: `core.storage.local_output` (a URL is refused
    in one line before the command runs, never written to `./s3:/...`)."""
    from blip3.core.storage import local_output

    return local_output(text)


def local_out_option(what: str, default=None):
    """`-o/--out` of a command that writes local files only (parsed by `local_output_path`)."""
    return typer.Option(default, "--out", "-o", parser=local_output_path,
                        help=f"{what[0].upper()}{what[1:]} (a local or mounted folder).")


def local_out_argument(what: str):
    """The positional (older) form of `local_out_option`."""
    return typer.Argument(None, parser=local_output_path, help=f"{what[0].upper()}{what[1:]} (the older form of -o/--out).")

#: `--storage-options` of the commands whose output may be an object store (core.storage).
StorageOptions = typer.Option(None, "--storage-options",
                              help='Object-store output or URL list (s3://, gs://, ...): fsspec filesystem arguments as JSON, '
                                   'e.g. \'{"endpoint_url": "http://minio:9000"}\' (else the usual environment variables).')

#: The kinds of source the catalog knows: one per record type of `core.records`, so a new kind
#: reaches `--kind` without an edit here.
SourceKind = Literal[tuple(RECORD_KINDS)]  # type: ignore[valid-type]
#: The input kinds of a datagen job (`datagen.inputs.INPUT_FORMATS`, checked equal by a test).
InputFormat = Literal["folder", "webdataset", "img2dataset", "urls", "blip3-ocr"]
