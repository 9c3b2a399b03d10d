"""Where the engine reads and writes: one `Location` type over fsspec; a local folder is just a path.

Why this module exists: `pathlib.Path("s3://bucket/out")` is the local relative path
`s3:/bucket/out`, so a command given such an output used to "succeed" into a local folder named
`s3:` while nothing reached the bucket. Every location a command takes goes through here:

- `Location(text, storage_options)`: a local path (`file:///abs` URLs mean the local path) or any
  fsspec URL (`s3://`, `gs://`, ...), configured the standard way (the filesystem's environment
  variables, e.g. `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, or `--storage-options JSON`). Picklable:
  the filesystem is rebuilt in each Ray worker from the URL and options.
- `output_location(text)`: the same, for something a command writes; refused up front are
  locations that cannot hold a job's output (`memory://` lives in one process, `http(s)://` is
  read-only, `a::b` chains cache reads), and `file://host/...` (a relative path in disguise).

A `Location` owns a shard folder's life (core.shards layout): listing finished shards (their stats
files), opening their files, publishing a shard (atomic, the stats file last), removing shards,
whether one is complete, and the writer's lock (`lock`, docs/storage.md: one job writes a folder
at a time, on object stores too, by a lease object with a heartbeat). Object stores have no
rename, so a shard is written to a local staging folder first (sha256 while writing) and
uploaded object by object; each upload is atomic and the stats object, the completion mark, goes
last. Store failures (no credentials, an endpoint out of reach, access denied) are one line
naming what to set (`store_errors`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from blip3.core.errors import UserError

if TYPE_CHECKING:
    import pyarrow as pa

    from blip3.core.shards import Shard

# A scheme followed by ":/" also catches what pathlib leaves of a URL ("s3:/bucket/out"); a
# scheme followed by "::" is an fsspec chain ("simplecache::s3://...").
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(?:/|:)")
#: Environment variables that configure object-store filesystems (boto's `AWS_*`, Google's,
#: Azure's, fsspec's own): the job's workers get the driver's values, so a cluster joined with
#: `--ray-address` writes where the user's shell says, not where each node's defaults point.
STORAGE_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "AZURE_STORAGE_", "FSSPEC_")
#: The extra that installs each object store's fsspec implementation.
_EXTRAS = {"s3": "s3", "s3a": "s3"}
#: Outputs refused up front, with why.
_NOT_OUTPUTS = {
    "memory": "memory:// lives in one process and is gone when the job ends",
    "http": "http(s):// locations are read-only",
    "https": "http(s):// locations are read-only",
}
_STATS = "_stats.json"
#: The writer's lock object in an output folder (see `Location.lock`).
LOCK_NAME = ".blip3-writer.lock"
LOCK_HEARTBEAT_S = 10.0
#: A lock whose heartbeat is older than this is a dead job's: the next job takes it over.
LOCK_STALE_S = 60.0
#: Object stores have no create-if-absent: a lease is written, then read back after this long;
#: of two jobs that wrote it at once, only the one whose lease is still there goes on.
LOCK_SETTLE_S = 1.0


def url_scheme(location: str | Path) -> str | None:
    """The lower-case scheme of a URL location (the first of a chain), None for a plain path."""
    match = _URL.match(str(location))
    return match.group(1).lower() if match else None


def _unmangled(text: str) -> str:
    """`s3:/bucket/x`, what `pathlib.Path` makes of `s3://bucket/x`, back as the URL it was."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):/(?!/)", text)
    if match and match.group(1).lower() != "file":
        return f"{match.group(1)}://{text[match.end():]}"
    return text


def _local(text: str, field: str) -> Path | None:
    """`text` as a local path, or None for a URL of another scheme than `file`."""
    scheme = url_scheme(text)
    if scheme is None:
        return Path(text)
    if scheme != "file" or "::" in text:
        return None
    rest = text[len("file:"):]
    if rest.startswith("//") and not rest.startswith("///"):
        host, _, path = rest[2:].partition("/")
        if host.lower() != "localhost":
            raise UserError(f"file://{host}/... names the host {host!r}; a local path is file:///absolute/path "
                            "or the path itself", field=field, file=text)
        rest = "/" + path
    return Path("/" + rest.lstrip("/"))


def local_path(location: str | Path, field: str) -> Path:
    """`location` as a local path; raises UserError for a URL of any scheme but `file`."""
    text = str(location)
    path = _local(text, field)
    if path is None:
        raise UserError(f"{url_scheme(text)}:// locations are not supported here; use a local or mounted folder",
                        field=field, file=text)
    return path


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


def storage_environment() -> dict[str, str]:
    """The driver's object-store settings among its environment variables (STORAGE_ENV_PREFIXES)."""
    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIXES)}


# -- store failures as one line --------------------------------------------------------------------
def _store_exceptions() -> tuple[type[BaseException], ...]:
    """What an object-store client raises for a store that cannot be reached or read: s3fs maps
    most to OSError; botocore's and aiohttp's own pass through."""
    kinds: list[type[BaseException]] = [OSError, ValueError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import BotoCoreError

        kinds.append(BotoCoreError)
    with contextlib.suppress(ImportError):
        from aiohttp import ClientError

        kinds.append(ClientError)
    return tuple(kinds)


def _store_hint(e: BaseException, scheme: str | None) -> str:
    """What the user sets to fix a store failure, from the exception chain's words."""
    words = " ".join(f"{type(x).__name__} {x}" for x in _chain(e)).lower()
    if scheme in ("s3", "s3a"):
        if "nocredentials" in words or "unable to locate credentials" in words:
            return ("no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass "
                    "--storage-options '{\"key\": ..., \"secret\": ...}'")
        if "endpointconnection" in words or "could not connect" in words or "connect call failed" in words \
                or "connection refused" in words or "cannot connect" in words:
            return ("cannot reach the endpoint: check AWS_ENDPOINT_URL (or --storage-options "
                    "'{\"endpoint_url\": ...}') and that the server is up")
        if "invalidaccesskeyid" in words or "signaturedoesnotmatch" in words or "forbidden" in words \
                or "access denied" in words or "accessdenied" in words:
            return "access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's policy"
        if "nosuchbucket" in words:
            return "no such bucket"
    if any(w in words for w in ("connect call failed", "cannot connect", "connection refused", "name or service not known")):
        return "cannot reach the server: check the URL (and --storage-options) and that the server is up"
    return ""


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


@contextlib.contextmanager
def store_errors(location: str) -> Iterator[None]:
    """Object-store failures as one line naming the location and what to set (a missing object
    passes through as FileNotFoundError: callers decide what missing means)."""
    try:
        yield
    except (FileNotFoundError, UserError):
        raise
    except _store_exceptions() as e:
        hint = _store_hint(e, url_scheme(location))
        detail = hint or " ".join(str(e).split())[:300] or type(e).__name__
        raise UserError(f"cannot use the store: {detail}", file=location) from None


# -- the one location type ---------------------------------------------------------------------------
class Location:
    """A folder (or a file) anywhere: a local path or any fsspec URL; see the module docstring.

    `url` is the location as catalogued: the resolved local path, or the URL as given (no trailing
    slash). `local_path` is the `Path` of a local one (None on a store), for the few readers that
    want the OS's own files (DuckDB's `read_parquet`, a shard writer's renames)."""

    def __init__(self, where: str | Path | "Location", storage_options: dict[str, Any] | None = None):
        if isinstance(where, Location):
            storage_options = where.storage_options if storage_options is None else storage_options
            where = where.url
        text = _unmangled(str(where))
        path = _local(text, "location")
        self.local_path: Path | None = None if path is None else path.resolve()
        self.url = str(self.local_path) if path is not None else text.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self._fs = None
        self._root = ""

    # pickling: the filesystem is rebuilt where the object lands (a Ray worker on another node)
    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options, "local": self.local_path is not None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # no re-parsing or path resolution: a shard plan's refs each carry one, unpickled per sample
        self.url, self.storage_options = state["url"], state["storage_options"]
        self.local_path = Path(self.url) if state["local"] else None
        self._fs, self._root = None, ""

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __fspath__(self) -> str:
        """A local location is just a path (`open(location)`, `Path(location)`); a store's is not."""
        if self.local_path is None:
            raise TypeError(f"{self.url} is not a local path")
        return self.url

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and (self.url, self.storage_options) == (other.url, other.storage_options)

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def is_local(self) -> bool:
        return self.local_path is not None

    @property
    def scheme(self) -> str:
        return url_scheme(self.url) or "file"

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Location":
        return Location(self.url.rsplit("/", 1)[0] or "/", self.storage_options)

    def child(self, name: str) -> "Location":
        """The location of `name` inside this folder."""
        return Location(self.where(name), self.storage_options)

    def where(self, name: str) -> str:
        """The location of one file of the folder, as catalogued."""
        return f"{self.url}/{name}" if name else self.url

    @property
    def fs(self):
        """The fsspec filesystem (built on first use: a missing implementation or bad options are one line)."""
        if self._fs is None:
            import fsspec

            if self.local_path is not None:
                from fsspec.implementations.local import LocalFileSystem

                self._fs, self._root = LocalFileSystem(), str(self.local_path)
                return self._fs
            try:
                self._fs, self._root = fsspec.core.url_to_fs(self.url, **self.storage_options)
            except ImportError:
                extra = _EXTRAS.get(self.scheme)
                hint = (f"pip install 'blip3-engine[{extra}]'" if extra
                        else f"install the fsspec package for {self.scheme}://")
                raise UserError(f"{self.scheme}:// locations need their fsspec filesystem: {hint}",
                                file=self.url) from None
            except (TypeError, ValueError) as e:
                raise UserError(f"cannot open: {e}", field="--storage-options", file=self.url) from None
        return self._fs

    def path(self, name: str = "") -> str:
        """The filesystem path of `name` in this folder (what `fs` methods take)."""
        self.fs  # noqa: B018 - resolves the root
        root = self._root.rstrip("/") if self._root not in ("/", "") else self._root
        if not name:
            return root
        return f"{root}/{name}" if root and root != "/" else f"{root}{name}"

    @contextlib.contextmanager
    def _errors(self, name: str = "") -> Iterator[None]:
        with store_errors(self.where(name)):
            yield

    # -- files -------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Names of the entries directly in the folder (none when it does not exist yet, or is a file)."""
        return list(self.listing())

    def listing(self) -> dict[str, dict[str, Any]]:
        """fsspec's details (size, type, mtime or ETag) of the entries directly in the folder, by name."""
        root = self.path().rstrip("/")
        with self._errors():
            try:
                entries = self.fs.ls(root, detail=True, **({} if self.is_local else {"refresh": True}))
            except (FileNotFoundError, NotADirectoryError):
                return {}
        if any(e["name"].rstrip("/") == root and e.get("type") != "directory" for e in entries):
            return {}  # listing a file gives the file itself: a file has no entries
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in entries}

    def find(self) -> dict[str, dict[str, Any]]:
        """Every file under the folder, recursively, by path relative to it, with fsspec's details
        (`size`, `mtime` or `ETag`); a local symbolic link whose target is gone is listed with its
        target as `dangling` (an input the user listed: it gets a failed row, not silence)."""
        if self.local_path is not None:
            return self._find_local()
        root = self.path()
        with self._errors():
            try:
                found = self.fs.find(root, detail=True)
            except FileNotFoundError:
                return {}
        prefix = root.rstrip("/") + "/"
        return {p[len(prefix):]: info for p, info in found.items() if p.startswith(prefix)}

    def _find_local(self) -> dict[str, dict[str, Any]]:
        root, found = self.local_path, {}
        if not root.is_dir():
            return found
        for p in root.rglob("*"):
            rel = p.relative_to(root).as_posix()
            if p.is_symlink() and not p.exists():
                found[rel] = {"name": str(p), "type": "file", "size": None, "dangling": os.readlink(p)}
            elif p.is_file():
                st = p.stat()
                found[rel] = {"name": str(p), "type": "file", "size": st.st_size, "mtime": st.st_mtime_ns}
        return found

    def exists(self, name: str = "") -> bool:
        """The folder (or `name` in it) is there; a store prefix exists when it holds something."""
        with self._errors(name):
            if name:
                return bool(self.fs.exists(self.path(name)))
            if self.local_path is not None:
                return self.local_path.is_dir()
        return bool(self.names())

    def glob(self) -> list[str]:
        """Locations matching this one taken as a glob pattern (`*`, `?`, `[...]`, `**`), sorted."""
        with self._errors():
            found = sorted(self.fs.glob(self.path()))
        return [p if self.local_path is not None else self.fs.unstrip_protocol(p) for p in found]

    def is_file(self, name: str = "") -> bool:
        with self._errors(name):
            return bool(self.fs.isfile(self.path(name)))

    def open(self, name: str = "", mode: str = "rb") -> BinaryIO:
        """A file of the folder (or this location itself), streamed, not downloaded first (a local
        one is the operating system's own file object: no wrapper in a loader's read path)."""
        if self.local_path is not None:
            return open(self.path(name), mode)
        with self._errors(name):
            return self.fs.open(self.path(name), mode)

    def read_bytes(self, name: str = "") -> bytes | None:
        with self._errors(name):
            try:
                if self.local_path is not None:  # a sample's read: a plain open, not fsspec's per-call work
                    with open(self._local(name), "rb") as f:
                        return f.read()
                return self.fs.cat_file(self.path(name))
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None

    def read_range(self, name: str, start: int, size: int) -> bytes:
        with self._errors(name):
            if self.local_path is not None:
                with open(self._local(name), "rb") as f:
                    f.seek(start)
                    return f.read(size)
            return self.fs.cat_file(self.path(name), start=start, end=start + size)

    def _local(self, name: str) -> str:
        return os.path.join(self.url, name) if name else self.url

    def size(self, name: str = "") -> int | None:
        with self._errors(name):
            try:
                info = self.fs.info(self.path(name))
            except FileNotFoundError:
                return None
        return None if info.get("type") == "directory" else int(info["size"])

    def stamp(self, name: str = "") -> str | None:
        """What changes when the file is rewritten, at the cost of one stat: size and mtime (a local
        file), size and ETag or modification time (an object); None when it is not there."""
        with self._errors(name):
            try:
                info = self.fs.info(self.path(name))
            except FileNotFoundError:
                return None
        return stamp_of(info)

    def sha256(self, name: str = "") -> str:
        """Re-hash one file (a full read)."""
        h = hashlib.sha256()
        with self._errors(name), self.fs.open(self.path(name), "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()

    def put(self, local: str | Path, name: str) -> None:
        """Copy a local file to `name`, atomically: an object upload, or a copy renamed into place."""
        if self.local_path is not None:
            target = self.local_path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if Path(local).resolve() == target:
                return
            if target.exists() and not target.is_file():  # a device or a pipe: written into, never replaced
                with open(local, "rb") as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                return
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            shutil.copyfile(local, tmp)
            os.replace(tmp, target)
            return
        with self._errors(name):
            self.fs.put_file(str(local), self.path(name))

    def put_tree(self, local: Path) -> None:
        """Copy every file under the local folder `local` here, keeping relative paths."""
        for p in sorted(local.rglob("*")):
            if p.is_file():
                self.put(p, p.relative_to(local).as_posix())

    def remove(self, name: str) -> None:
        with self._errors(name):
            try:
                self.fs.rm_file(self.path(name))
            except FileNotFoundError:
                pass

    def mkdir(self) -> None:
        """Create a local folder (a store prefix exists once something is written under it)."""
        if self.local_path is not None:
            self.local_path.mkdir(parents=True, exist_ok=True)

    def write_bytes(self, data: bytes, name: str = "") -> None:
        """Write a whole file (`name` in this folder, or this location), atomically."""
        with self.staged_file(name) as local:
            local.write_bytes(data)

    @contextlib.contextmanager
    def staged_file(self, name: str = "") -> Iterator[Path]:
        """A local path to write `name` (or this location, a file) into; published when the block
        ends without an error (renamed, or uploaded), discarded otherwise."""
        target = self if not name else self.child(name)
        with tempfile.TemporaryDirectory(prefix="blip3-out-") as tmp:
            local = Path(tmp) / (target.name or "out")
            yield local
            target.parent.put(local, target.name)

    @contextlib.contextmanager
    def staged_folder(self) -> Iterator[Path]:
        """A local folder to write this location's files into: the folder itself when local, else
        a staging folder uploaded file by file when the block ends without an error."""
        if self.local_path is not None:
            self.local_path.mkdir(parents=True, exist_ok=True)
            yield self.local_path
            return
        with tempfile.TemporaryDirectory(prefix="blip3-out-") as tmp:
            yield Path(tmp)
            self.put_tree(Path(tmp))

    # -- a shard folder (core.shards layout) --------------------------------------------------------
    def read_json(self, name: str) -> dict[str, Any] | None:
        data = self.read_bytes(name)
        try:
            value = None if data is None else json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return value if isinstance(value, dict) else None

    def stats(self, name: str) -> dict[str, Any] | None:
        """The stats file of shard `name` (`00012`), None when missing or unreadable."""
        return self.read_json(f"{name}{_STATS}")

    def finished(self, stems: list[str] | None = None) -> list[Shard]:
        """Finished shards by index: all of them, or those named by `stems` (`00012`). A stats file
        that cannot be read is not a finished shard (`tars_without_stats` reports its tar)."""
        from blip3.core.shards import Shard

        if stems is None:
            stems = sorted(n[: -len(_STATS)] for n in self.names() if n.endswith(_STATS))
        stems = [s for s in stems if s.isdigit()]
        shards = []
        for stem, data in zip(stems, self._read_all([f"{s}{_STATS}" for s in stems])):
            try:
                shards.append(Shard.from_stats(json.loads(data), self.where(f"{stem}.tar"),
                                               self.where(f"{stem}.parquet"), self.where(f"{stem}{_STATS}")))
            except (TypeError, json.JSONDecodeError, UnicodeDecodeError, KeyError, ValueError, AttributeError):
                continue
        return sorted(shards, key=lambda s: s.index)

    def _read_all(self, names: list[str]) -> list[bytes | None]:
        """The bytes of small files (None for a missing one), fetched together."""
        if not names:
            return []
        paths = [self.path(n) for n in names]
        with self._errors():
            got = self.fs.cat(paths, on_error="return")
        return [None if isinstance(got.get(p), BaseException) else got.get(p) for p in paths]

    def tar_sizes(self, shards: list[Shard] | None = None) -> dict[str, int]:
        """Size of every `*.tar` of the folder (one listing), or of the tars of `shards` only, by
        location; a missing tar has none."""
        if shards is not None:
            out = {}
            for s in shards:
                size = self.size(s.tar.rsplit("/", 1)[-1])
                if size is not None:
                    out[s.tar] = size
            return out
        sizes = {}
        for name, e in self.listing().items():
            if name.endswith(".tar") and e.get("type") != "directory":
                size = e.get("size")  # an HTTP listing gives names only: asked one by one
                size = self.size(name) if size is None else int(size)
                if size is not None:
                    sizes[self.where(name)] = size
        return sizes

    def tars_without_stats(self, listed: list[Shard], sizes: dict[str, int]) -> list[tuple[str, str]]:
        """`NNNNNN.tar` files that no readable stats file describes (a killed writer, a hand-copied
        tar, a corrupt stats file), as (location, reason): they are not registered, and say so."""
        known = {s.tar for s in listed}
        names = set(self.names())
        missing = []
        for tar in sorted(sizes):
            stem = tar.rsplit("/", 1)[-1][: -len(".tar")]
            if tar in known or not stem.isdigit():
                continue
            reason = ("stats file unreadable" if f"{stem}{_STATS}" in names
                      else "no stats file (unfinished, or not written by blip3)")
            missing.append((tar, reason))
        return missing

    def is_complete(self, name: str, *, verify_checksum: bool = True, stats: dict[str, Any] | None = None) -> bool:
        """Shard `name` was published whole: stats present, parquet present, the tar of the recorded
        size and, with `verify_checksum`, sha256 (without it the stats' sha256 is trusted: hash once)."""
        stats = self.stats(name) if stats is None else stats
        if stats is None:
            return False
        if self.size(f"{name}.parquet") is None or self.size(f"{name}.tar") != stats.get("tar_bytes"):
            return False
        return not verify_checksum or self.sha256(f"{name}.tar") == stats.get("sha256")

    def publish(self, staging: Path, name: str) -> None:
        """Publish shard `name` written (and finished) in the local folder `staging`: tar, parquet,
        then the stats file, the completion mark, last; a run killed in between leaves a shard
        that does not count as done."""
        for suffix in (".tar", ".parquet", _STATS):
            self.put(staging / f"{name}{suffix}", f"{name}{suffix}")

    def remove_shards(self, keep_below: int = 0, digits: int | None = None) -> list[int]:
        """Delete every published shard (tar, parquet, stats: stats first, so a half-removed shard
        never looks complete) whose index is `keep_below` or more, or whose name has another width
        than `digits`; returns the removed indices."""
        stems = set()
        for name in self.names():
            for suffix in (_STATS, ".tar", ".parquet"):
                stem = name[: -len(suffix)] if name.endswith(suffix) else ""
                if stem.isdigit() and (int(stem) >= keep_below or (digits is not None and len(stem) != digits)):
                    stems.add(stem)
        for stem in sorted(stems):
            for suffix in (_STATS, ".parquet", ".tar"):
                self.remove(f"{stem}{suffix}")
        return sorted(int(n) for n in stems)

    def clean_temporaries(self) -> int:
        """Remove leftovers of killed writers (`.NNNNNN.tar.tmp-*`); returns how many. Only a local
        folder has any: on a store, shards are staged in local temporary folders."""
        if self.local_path is None or not self.local_path.is_dir():
            return 0
        n = 0
        for p in self.local_path.glob(".*.tmp-*"):
            p.unlink(missing_ok=True)
            n += 1
        return n

    def sidecars(self, shards: list[Shard]) -> "pa.Table":
        """The sidecar rows of `shards` with a `shard` column (the tar's location), read through
        fsspec (DuckDB reads a local folder's parquet files itself)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from blip3.core.shards import SIDECAR_COLUMNS

        columns = [c for c in SIDECAR_COLUMNS if c != "caption"]
        tables = []
        for s in shards:
            with store_errors(s.parquet), self.fs.open(self.path(s.parquet.rsplit("/", 1)[-1]), "rb") as f:
                t = pq.read_table(f, columns=columns)
            tables.append(t.append_column("shard", pa.array([s.tar] * t.num_rows, pa.string())))
        return pa.concat_tables(tables)

    # -- the writer's lock ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, job: str = "") -> Iterator["WriterLock"]:
        """Hold the folder's writer lock for the block: a second job on the same output is refused
        in one line, whatever its settings, until this one ends (docs/storage.md)."""
        held = WriterLock(self, job)
        held.acquire()
        try:
            yield held
        finally:
            held.release()


def stamp_of(info: dict[str, Any]) -> str:
    """`Location.stamp` of an fsspec info/listing entry."""
    version = next((info[k] for k in ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified",
                                       "last_modified", "updated", "created") if info.get(k) is not None), "")
    if isinstance(version, float):  # a local mtime in seconds: keep nanoseconds where the OS has them
        version = repr(version)
    return f"{info.get('size')}:{str(version).strip(chr(34))}"


class WriterLock:
    """One job's hold on an output folder: a small JSON object (`LOCK_NAME`) naming the job, its
    host and process, refreshed every LOCK_HEARTBEAT_S by a thread of the driver.

    Taken with create-if-absent on a local folder; on an object store (no such operation), the
    lease is written, then read back after LOCK_SETTLE_S: of two jobs that raced, the one whose
    lease is still there goes on, the other is refused. A lock whose heartbeat is older than
    LOCK_STALE_S, or whose process is gone from this host, was left by a killed job and is taken over.
    """

    def __init__(self, where: Location, job: str):
        self.where = where
        self.token = uuid.uuid4().hex
        self.info = {"token": self.token, "job": job, "host": socket.gethostname(), "pid": os.getpid(),
                     "started": time.time(), "heartbeat": time.time()}
        self.lost: str | None = None
        #: a local output folder this lock made: removed again when the job leaves it empty
        self._made = where.local_path is not None and not where.local_path.exists()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        return self.where.read_json(LOCK_NAME)

    def _write(self, exclusive: bool = False) -> bool:
        """Write our lease; with `exclusive` on a local folder, only if there is none (False then)."""
        self.info["heartbeat"] = time.time()
        data = json.dumps(self.info).encode()
        local = self.where.local_path
        if local is None:
            with store_errors(self.where.where(LOCK_NAME)):
                self.where.fs.pipe_file(self.where.path(LOCK_NAME), data)
            return True
        local.mkdir(parents=True, exist_ok=True)
        tmp = local / f".{LOCK_NAME}.tmp-{self.token}"
        tmp.write_bytes(data)
        if exclusive:
            # a hard link appears whole or not at all: a racing job never reads a lock file that is
            # created but not yet written (it would take that for no lock, and write its own)
            try:
                os.link(tmp, local / LOCK_NAME)
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: create-if-absent, then write
                try:
                    fd = os.open(local / LOCK_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            finally:
                tmp.unlink()
            return True
        os.replace(tmp, local / LOCK_NAME)
        return True

    def _refuse(self, other: dict[str, Any]) -> UserError:
        since = time.strftime("%H:%M:%S", time.localtime(float(other.get("started", 0))))
        job = f" ({other['job']})" if other.get("job") else ""
        return UserError(f"another job{job} is writing this output (host {other.get('host')}, pid {other.get('pid')}, "
                         f"since {since}); wait for it to end or choose another output", file=self.where.url)

    def acquire(self) -> None:
        local = self.where.local_path is not None
        if local and self._write(exclusive=True):
            self._start()
            return
        other = self._read()
        if other is not None and not _stale(other):
            raise self._refuse(other)
        self._write()
        time.sleep(LOCK_SETTLE_S if not local else LOCK_SETTLE_S / 5)
        now = self._read()
        if now is None or now.get("token") != self.token:
            raise self._refuse(now or other or {})
        self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="blip3-writer-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                now = self._read()
                if now is not None and now.get("token") != self.token:
                    self.lost = f"host {now.get('host')}, pid {now.get('pid')}"
                    return
                self._write()
            except Exception:  # a store hiccup: the next beat tries again (a lease lives LOCK_STALE_S)
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(Exception):
            now = self._read()
            if now is not None and now.get("token") == self.token:
                self.where.remove(LOCK_NAME)
        if self._made:
            with contextlib.suppress(OSError):
                self.where.local_path.rmdir()
        if self.lost:
            raise UserError(f"the output lock was taken over by another job ({self.lost}) while this one ran; "
                            "check the folder before using it", file=self.where.url)


def _stale(info: dict[str, Any]) -> bool:
    """A lock left by a job that is gone: no heartbeat for LOCK_STALE_S, or its process has ended
    (when it ran on this host)."""
    try:
        if time.time() - float(info.get("heartbeat", 0)) > LOCK_STALE_S:
            return True
        if info.get("host") == socket.gethostname():
            os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, TypeError, ValueError):
        return False
    return False


def as_location(where: str | Path | Location, storage_options: dict[str, Any] | None = None) -> Location:
    """`where` as a Location (a Location passes through)."""
    return where if isinstance(where, Location) and storage_options is None else Location(where, storage_options)


def output_location(where: str | Path | Location, storage_options: dict[str, Any] | None = None,
                    field: str = "--output") -> Location:
    """Where a command writes: refused up front when it cannot hold an output (see the module docstring)."""
    text = where.url if isinstance(where, Location) else _unmangled(str(where))
    scheme = url_scheme(text)
    if "::" in text.split("/", 1)[0] or (scheme is not None and text[len(scheme) + 1:].startswith(":")):
        raise UserError("a chained URL (a::b://...) caches reads and cannot be an output; give the target URL itself",
                        field=field, file=text)
    if scheme in _NOT_OUTPUTS:
        raise UserError(f"cannot be an output: {_NOT_OUTPUTS[scheme]}", field=field, file=text)
    _local(text, field)  # file://host/... is refused here
    return as_location(where, storage_options)


def local_output(where: str | Path, field: str = "--out") -> Path:
    """Where a command that writes local files only writes: the path as given (`file:///abs` URLs
    mean the path); any other URL is one line, never a local folder named after it."""
    text = _unmangled(str(where))
    location = output_location(text, field=field)
    if not location.is_local:
        raise UserError(f"{location.scheme}:// is not supported for this output; write to a local (or mounted) "
                        "folder and copy it", field=field, file=text)
    return _local(text, field)


@contextlib.contextmanager
def staged_input(location: str | Path, storage_options: dict[str, Any] | None, suffixes: tuple[str, ...]):
    """A local path for an input: the path itself, or, for a URL of a small list file (one of
    `suffixes`: a URL list), a temporary local copy that lives as long as the block."""
    where = Location(location, storage_options)
    if where.local_path is not None:
        yield where.local_path
        return
    if not where.name.lower().endswith(suffixes):
        raise UserError(f"{where.scheme}:// inputs of this kind are read from a local or mounted folder",
                        file=where.url)
    with tempfile.TemporaryDirectory(prefix="blip3-input-") as tmp:
        local = Path(tmp) / where.name
        data = where.read_bytes()
        if data is None:
            raise UserError("input does not exist", file=where.url)
        local.write_bytes(data)
        yield local


# Old names, kept while callers move over.
RemoteDir = Location
