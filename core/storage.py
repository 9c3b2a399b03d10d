"""Where datagen reads and writes: a local (or shared, mounted) folder, or any fsspec filesystem.

Why this module exists: `pathlib.Path("s3://bucket/out")` is the local relative path
`s3:/bucket/out`, so a job given such an output used to "succeed" into a local folder named `s3:`
while nothing reached the bucket. Every output therefore goes through `output_location`: a local
path stays a `Path` (`file://` URLs mean the local path), any other URL (`s3://`, `gs://`, ...)
becomes a `RemoteDir`, configured the standard way (the filesystem's usual environment variables,
e.g. `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, or `--storage-options JSON`). A URL list on such a
store is read from a local copy (`staged_input`); image folders and tars there are read in place
by the shard tasks (`datagen.plans`).

Object stores have no rename, so a shard is written to a local temporary folder first (sha256 while
writing, as for a local output) and uploaded object by object; each upload is atomic, and the stats
object, the completion mark, goes last.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import re
from pathlib import Path
from typing import Any

from blip3.core.errors import UserError

# A scheme followed by ":/" also catches what pathlib leaves of a URL ("s3:/bucket/out").
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")
#: Environment variables that configure object-store filesystems (boto's `AWS_*`, Google's,
#: Azure's, fsspec's own): the job's workers get the driver's values, so a cluster joined with
#: `--ray-address` writes where the user's shell says, not where each node's defaults point.
STORAGE_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "AZURE_STORAGE_", "FSSPEC_")
#: The extra that installs each object store's fsspec implementation.
_EXTRAS = {"s3": "s3", "s3a": "s3"}


def url_scheme(location: str | Path) -> str | None:
    """The lower-case scheme of a URL location, None for a plain path."""
    match = _URL.match(str(location))
    return match.group(1).lower() if match else None


def local_path(location: str | Path, field: str) -> Path:
    """`location` as a local path; raises UserError for a URL of any scheme but `file`."""
    text = str(location)
    scheme = url_scheme(text)
    if scheme is None:
        return Path(text)
    if scheme == "file":
        return Path(re.sub(r"^file:/+", "/", text, flags=re.IGNORECASE))
    raise UserError(f"{scheme}:// locations are not supported here; use a local or mounted folder "
                    "(object stores can be mounted, e.g. with s3fs-fuse or gcsfuse)", field=field, file=text)


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """`--storage-options`: a JSON object of fsspec filesystem arguments (e.g. `{"endpoint_url": ...}`)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"not valid JSON: {e.msg}", field="--storage-options") from None
    if not isinstance(value, dict):
        raise UserError("must be a JSON object", field="--storage-options")
    return value


class RemoteDir:
    """A folder on an fsspec filesystem. Picklable (the filesystem is rebuilt in each worker from
    the URL and options), so Ray workers on any node upload their own shards."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = str(url).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self._fs = None
        self._root = ""

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])

    def __str__(self) -> str:
        return self.url

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def fs(self):
        if self._fs is None:
            import fsspec

            scheme = url_scheme(self.url) or "file"
            try:
                self._fs, self._root = fsspec.core.url_to_fs(self.url, **self.storage_options)
            except ImportError:
                extra = _EXTRAS.get(scheme)
                hint = f"pip install 'blip3-engine[{extra}]'" if extra else f"install the fsspec package for {scheme}://"
                raise UserError(f"{scheme}:// outputs need their fsspec filesystem: {hint}", file=self.url) from None
            except (TypeError, ValueError) as e:
                raise UserError(f"cannot open: {e}", field="--storage-options", file=self.url) from None
        return self._fs

    def path(self, name: str) -> str:
        self.fs  # noqa: B018 - resolves the root
        return f"{self._root}/{name}" if self._root else name

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.path(name))
        except FileNotFoundError:
            return None

    def size(self, name: str) -> int | None:
        try:
            return int(self.fs.size(self.path(name)))
        except FileNotFoundError:
            return None

    def names(self) -> list[str]:
        """Names of the objects directly in the folder (none when it does not exist yet)."""
        try:
            listing = self.fs.ls(self.path("").rstrip("/"), detail=False, refresh=True)
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in listing]
        except FileNotFoundError:
            return []

    def upload(self, local: Path, name: str) -> None:
        self.fs.put_file(str(local), self.path(name))

    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self.path(name))
        except FileNotFoundError:
            pass


def storage_environment() -> dict[str, str]:
    """The driver's object-store settings among its environment variables (STORAGE_ENV_PREFIXES)."""
    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIXES)}


@contextlib.contextmanager
def staged_input(location: str | Path, storage_options: dict[str, Any] | None, suffixes: tuple[str, ...]):
    """A local path for an input: the path itself, or, for an object-store URL of a small list file
    (one of `suffixes`: a URL list), a temporary local copy that lives as long as the block.
    Any other object-store location is refused in one line (image folders and tars are not staged:
    `datagen.plans` reads them in place)."""
    if url_scheme(location) in (None, "file"):
        yield local_path(location, "input")
        return
    url = str(location)
    parent, _, name = url.rstrip("/").rpartition("/")
    if not name.lower().endswith(suffixes):
        local_path(url, "input")  # raises: the one line for object-store locations
    store = RemoteDir(parent, storage_options)
    with tempfile.TemporaryDirectory(prefix="blip3-input-") as tmp:
        local = Path(tmp) / name
        try:
            store.fs.get_file(store.path(name), str(local))
        except FileNotFoundError:
            raise UserError("input does not exist", file=url) from None
        yield local


def output_location(location: str | Path, storage_options: dict[str, Any] | None = None) -> Path | RemoteDir:
    """A job's output: a local `Path`, or a `RemoteDir` for any URL but `file://`."""
    scheme = url_scheme(location)
    if scheme is None or scheme == "file":
        return local_path(location, "output")
    return RemoteDir(str(location), storage_options)
