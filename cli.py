"""`blip3`: the command line of blip3-engine.

Command groups live beside the code they drive (each package's `commands.py` has a
`register(app)`), so this file only wires them together and turns user errors into one line.
Heavy libraries (torch, ray) are imported inside commands, so `blip3 --help` stays instant.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from blip3.core.errors import UserError, environment_error
from blip3.core.options import DbOption, Format, FormatOption, OutOption, SourceKind, StorageOptions

app = typer.Typer(
    name="blip3",
    help="Data engine and slim trainer for xGen-MM (BLIP-3) style multimodal models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"blip3 {version('blip3-engine')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Data engine and slim trainer for xGen-MM (BLIP-3) style multimodal models."""
catalog_app = typer.Typer(help="Register shards in the DuckDB catalog and summarise it.", no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")



@catalog_app.command("add")
def catalog_add(
    output_dir: str = typer.Argument(..., help="A folder of NNNNNN.tar shards with their sidecars, local or on an "
                                    "object store (s3://bucket/prefix, ...)."),
    source: Optional[str] = typer.Option(None, "--source", help="Source name (default: the folder name)."),
    kind: SourceKind = typer.Option("caption", "--kind", help="The kind of samples the shards hold."),
    refresh: bool = typer.Option(False, "--refresh", help="Re-read shards whose tar changed."),
    verify: bool = typer.Option(False, "--verify", help="Re-hash every tar (default: trust the sha256 its "
                                "writer recorded, checking the size)."),
    storage_options: Optional[str] = StorageOptions,
    db: Path = DbOption,
) -> None:
    """Register finished shards and their per-sample sidecar rows (idempotent)."""
    from blip3.core.catalog import Catalog
    from blip3.core.logs import console
    from blip3.core.storage import parse_storage_options

    options = parse_storage_options(storage_options)
    with Catalog(db) as cat:
        r = cat.add_output(output_dir, source=source, kind=kind, refresh=refresh, verify=verify,
                           storage_options=options)
    console.print(r.summary(), highlight=False, soft_wrap=True)
    if r.failed:
        for path, reason in r.failed:
            console.print(f"[red]not registered:[/] {path}: {reason}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)  # the good shards are registered; the exit status says some were not


@catalog_app.command("stats")
def catalog_stats(fmt: Format = FormatOption, out: Optional[Path] = OutOption, db: Path = DbOption) -> None:
    """Print a summary table per source: shards, samples, failures, caption length, coverage."""
    from blip3.core.sql import run_query
    from blip3.core.tables import write_result

    write_result(run_query("SELECT * FROM v_source_summary ORDER BY source", db), fmt=fmt, out=out, title="catalog")


@app.command("sql")
def sql(
    query: str = typer.Argument(..., help='A read-only query, e.g. "SELECT * FROM v_source_summary".'),
    fmt: Format = FormatOption,
    out: Optional[Path] = OutOption,
    db: Path = DbOption,
) -> None:
    """Run a read-only SQL query on the catalog (statements that write are refused)."""
    from blip3.core.sql import run_query
    from blip3.core.tables import write_result

    write_result(run_query(query, db), fmt=fmt, out=out)


#: The packages that add command groups (each `commands.py` has a `register(app)`).
COMMAND_MODULES = ("blip3.datagen.commands", "blip3.mixture.commands", "blip3.train.commands",
                   "blip3.model.commands", "blip3.demo.commands",
                   "blip3.eval.commands")


def _register_groups(modules: tuple[str, ...] = COMMAND_MODULES) -> None:
    """Each package adds its own commands. A module that fails to import is a broken install, not
    an optional part: the error propagates, so a command group never silently goes missing."""
    import importlib

    for module in modules:
        importlib.import_module(module).register(app)


_register_groups()


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGINT: raised where the program is, so every `finally` on the way out runs (the
    shard being written is dropped, finished ones stay; the Ray cluster stops and its session folder
    goes), as on Ctrl-C."""


_stopped_by: list[int] = []  # the signal that stopped this run, if one did


def _stop(signum: int, frame) -> None:
    _stopped_by.append(signum)
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
    raise Stopped(signum)


def _catch_stop_signals() -> None:
    signal.signal(signal.SIGTERM, _stop)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when started ignoring it
        signal.signal(signal.SIGINT, _stop)


def main() -> None:
    _catch_stop_signals()
    try:
        app(standalone_mode=True)
    except SystemExit:
        if not _stopped_by:
            raise
        from blip3.core.logs import console

        name = signal.Signals(_stopped_by[0]).name
        console.print(f"[bold red]stopped:[/] {name}; finished work is kept (run the same command again to "
                      "continue)", highlight=False, soft_wrap=True)
        sys.exit(128 + _stopped_by[0])
    except Exception as e:  # only user errors end here: anything else is raised again, loud
        err = e if isinstance(e, UserError) else environment_error(e)
        if err is None:
            raise
        from blip3.core.logs import console

        console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
