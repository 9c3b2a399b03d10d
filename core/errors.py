"""User-facing errors.

A `UserError` is bad input from the person at the keyboard (a malformed manifest, a missing path,
a refused SQL statement). The CLI prints it as one line and exits 2; everything else is a
programming error and stays loud with its traceback.
"""

from __future__ import annotations

import errno
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


#: OSErrors that are the machine's state, not a bug: the user fixes them (frees space, picks another
#: folder), so the CLI prints them as one line. Anything else from the OS stays a traceback.
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on the device; free some space and run again",
    errno.EDQUOT: "disk quota exceeded; free some space and run again",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.EEXIST: "exists and is not a folder",
    errno.ENAMETOOLONG: "file name too long",
}


def environment_error(e: BaseException) -> UserError | None:
    """The one-line UserError for a disk-full / permission / not-a-folder OSError, or None.

    The OSError may arrive wrapped: chained (`raise ... from`), or as a Ray task error raised in a
    worker (Ray keeps the original in `.cause`), so the whole chain is searched.
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in ENVIRONMENT_ERRNOS:
            return UserError(ENVIRONMENT_ERRNOS[cur.errno], file=cur.filename)
        stack += [cur.__cause__, cur.__context__, getattr(cur, "cause", None)]
    return None


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
