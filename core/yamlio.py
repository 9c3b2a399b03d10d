"""Reading a YAML file the user named: a missing file or bad YAML is a one-line `UserError`
naming the file, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from blip3.core.errors import UserError


def read_yaml(path: str | Path, what: str = "file") -> Any:
    """The parsed content of `path`; `what` names the file in the "not found" error ("spec",
    "manifest"). Parser messages span lines and are folded into one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found", file=path)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"not valid YAML: {' '.join(str(e).split())}", file=path) from None
