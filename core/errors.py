"""User-facing errors.

A `UserError` is bad input from the person at the keyboard (a malformed manifest, a missing path,
a refused SQL statement). The CLI prints it as one line and exits 2; everything else is a
programming error and stays loud with its traceback.
"""

from __future__ import annotations

from pathlib import Path


class UserError(ValueError):
    """An error the user can fix; the message names the field and the file where there is one."""

    def __init__(self, message: str, *, field: str | None = None, file: str | Path | None = None):
        parts = []
        if file is not None:
            parts.append(str(file))
        if field is not None:
            parts.append(field)
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.field = field
        self.file = None if file is None else str(file)


class MissingWeightsError(UserError):
    """Model weights are not where we looked; the message says which path or env var to set."""


def describe_exception(e: BaseException) -> str:
    """`Type: message` of an exception recorded as a sample's failure reason.

    Some engines raise with no message and put the real reason in the chained exception
    (rapidocr's `raise ResizeImgError() from exc`), which alone would read as a bare type name; the
    chain is followed until a message is found, so the row says what actually went wrong.
    """
    parts = [type(e).__name__]
    cause: BaseException | None = e
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        message = " ".join(str(cause).split())
        if message:
            if cause is not e:
                parts.append(type(cause).__name__)
            parts.append(message)
            break
        cause = cause.__cause__ or cause.__context__
    else:
        parts.append(repr(e))
    return ": ".join(parts)
