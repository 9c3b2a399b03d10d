"""Reading a YAML file the user named: a missing or unreadable file, bytes that are not UTF-8, bad
YAML or YAML nested deeper than the parser can follow is a one-line `UserError` naming the file,
never a traceback."""

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
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 text (byte {e.start}); save the file as UTF-8", file=path) from None
    except OSError as e:
        raise UserError(f"cannot read: {e.strerror}", file=path) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"not valid YAML: {' '.join(str(e).split())}", file=path) from None
    except RecursionError:  # `[[[[...` thousands deep: the parser recurses once per level
        raise UserError("YAML nested too deeply to read", file=path) from None
