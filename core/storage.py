"""Where datagen reads and writes: local (or shared, mounted) folders.

Object-store URLs (`s3://`, `gs://`, `hf://`, ...) are refused with one clear line. The reason
this module exists: `pathlib.Path("s3://bucket/out")` is the local relative path `s3:/bucket/out`,
so a job given such an output used to "succeed" into a local folder named `s3:` while nothing
reached the bucket. `file://` URLs are accepted and mean the local path.
"""

from __future__ import annotations

import re
from pathlib import Path

from blip3.core.errors import UserError

# A scheme followed by ":/" also catches what pathlib leaves of a URL ("s3:/bucket/out").
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")


def local_path(location: str | Path, field: str) -> Path:
    """`location` as a local path; raises UserError for a URL of any scheme but `file`."""
    text = str(location)
    match = _URL.match(text)
    if match is None:
        return Path(text)
    scheme = match.group(1).lower()
    if scheme == "file":
        return Path(re.sub(r"^file:/+", "/", text, flags=re.IGNORECASE))
    raise UserError(f"{scheme}:// locations are not supported; use a local or mounted folder "
                    "(object stores can be mounted, e.g. with s3fs-fuse or gcsfuse)", field=field, file=text)
