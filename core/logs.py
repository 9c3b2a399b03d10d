"""One console, one logger setup and one progress-bar factory that every command reuses."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
# Piped or redirected, a summary line stays one line (greppable) instead of wrapping at 80 columns.
console.soft_wrap = not console.is_terminal
_configured = False


def get_logger(name: str) -> logging.Logger:
    """A logger under the `blip3` namespace; level from BLIP3_LOG_LEVEL (default INFO)."""
    global _configured
    if not _configured:
        root = logging.getLogger("blip3")
        root.setLevel(os.environ.get("BLIP3_LOG_LEVEL", "INFO").upper())
        handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.propagate = False
        _configured = True
    return logging.getLogger(f"blip3.{name}")


def progress_enabled() -> bool:
    """Bars are on in a terminal and off when BLIP3_NO_PROGRESS is set (tests, CI logs)."""
    return not os.environ.get("BLIP3_NO_PROGRESS")


#: The bar on screen, if any: a step run inside another (a datagen job's shards while its input
#: is listed) adds its rows to it instead of opening a second live display, whose rows would be
#: drawn over the first one's and lose their final counts.
_active: Progress | None = None


@contextmanager
def progress(transient: bool = False) -> Iterator[Progress]:
    """A rich progress bar with count, rate and ETA columns, on stderr (never on piped stdout)."""
    global _active
    if _active is not None:
        yield _active
        return
    bar = Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=not progress_enabled(),
    )
    _active = bar
    try:
        with bar:
            yield bar
    finally:
        _active = None
