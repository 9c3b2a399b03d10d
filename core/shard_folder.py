"""A folder of finished shards as the catalog reads it: local (or mounted), or on an object store.

Why this module exists: `catalog add`, `mix build` and the datagen driver register and check
shards wherever datagen wrote them, and `s3://bucket/out` is not a `pathlib.Path`. Everything the
catalog needs from a folder goes through `ShardFolder`: which shards are finished (their stats
files), the tars' sizes, a tar's sha256 (only when the user asks for a re-read: the stats carry
the sha256 computed while writing), and, on an object store, the sidecar rows. Locations are
strings: a resolved local path, or the URL (`s3://bucket/out/00000.tar`), the catalog's key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from blip3.core.errors import UserError
from blip3.core.shards import SIDECAR_COLUMNS, file_sha256
from blip3.core.storage import RemoteDir, output_location, url_scheme

_STATS = "_stats.json"


@dataclass
class FinishedShard:
    """What a finished shard's stats file says, with where its tar and sidecar are."""

    index: int
    tar: str  # resolved local path or URL: the catalog's key
    parquet: str
    sha256: str
    tar_bytes: int
    count: int
    successes: int
    failed: int
    generator: dict[str, Any] = field(default_factory=dict)


def _finished(stats: dict[str, Any], tar: str, parquet: str) -> FinishedShard:
    return FinishedShard(index=int(stats["shard"]), tar=tar, parquet=parquet, sha256=str(stats["sha256"]),
                         tar_bytes=int(stats["tar_bytes"]), count=int(stats["count"]),
                         successes=int(stats["successes"]), failed=int(stats["failed"]),
                         generator=stats.get("generator") or {})


def is_remote(location: str | Path) -> bool:
    """True for an object-store URL (any scheme but `file`)."""
    return url_scheme(location) not in (None, "file")


def _store_exceptions() -> tuple[type[BaseException], ...]:
    """What an object-store client raises for a store that cannot be reached or read (no
    credentials, a wrong endpoint, access denied): s3fs maps most to OSError, botocore's own pass."""
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return (OSError, ValueError)
    return (OSError, ValueError, BotoCoreError)


@contextlib.contextmanager
def store_errors(location: str) -> Iterator[None]:
    """Object-store failures as one line naming the location (a missing object passes through)."""
    try:
        yield
    except FileNotFoundError:
        raise
    except _store_exceptions() as e:
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        raise UserError(f"cannot read the object store: {detail}", file=location) from None


class ShardFolder:
    """An output folder of `NNNNNN.tar` + `.parquet` + `_stats.json` shards (core.shards layout)."""

    def __init__(self, location: str | Path | RemoteDir, storage_options: dict[str, Any] | None = None):
        where = location if isinstance(location, RemoteDir) else output_location(location, storage_options)
        self.remote: RemoteDir | None = where if isinstance(where, RemoteDir) else None
        self.local: Path | None = None if self.remote else Path(where).resolve()

    @property
    def location(self) -> str:
        return self.remote.url if self.remote else str(self.local)

    @property
    def name(self) -> str:
        return self.remote.name if self.remote else self.local.name

    def exists(self) -> bool:
        return bool(self._names()) if self.remote else self.local.is_dir()

    def _names(self) -> list[str]:
        if not self.remote:
            return [p.name for p in self.local.iterdir()]
        with store_errors(self.remote.url):
            return self.remote.names()

    def where(self, name: str) -> str:
        """The location of one file of the folder, as catalogued."""
        return f"{self.remote.url}/{name}" if self.remote else str(self.local / name)

    def finished(self, stems: list[str] | None = None) -> list[FinishedShard]:
        """Finished shards by index: all of them, or those named by `stems` (`00012`). A stats file
        that cannot be read is not a finished shard (`tars_without_stats` reports its tar)."""
        if stems is None:
            stems = sorted(n[: -len(_STATS)] for n in self._names() if n.endswith(_STATS))
        stems = [s for s in stems if s.isdigit()]
        shards = []
        for stem, data in zip(stems, self._read_all([f"{s}{_STATS}" for s in stems])):
            try:
                shards.append(_finished(json.loads(data), self.where(f"{stem}.tar"), self.where(f"{stem}.parquet")))
            except (TypeError, json.JSONDecodeError, UnicodeDecodeError, KeyError, ValueError):
                continue
        return sorted(shards, key=lambda s: s.index)

    def _read_all(self, names: list[str]) -> list[bytes | None]:
        """The bytes of small files (None for a missing one); on an object store fetched together."""
        if not self.remote:
            out = []
            for n in names:
                try:
                    out.append((self.local / n).read_bytes())
                except FileNotFoundError:
                    out.append(None)
            return out
        if not names:
            return []
        with store_errors(self.remote.url):
            paths = [self.remote.path(n) for n in names]
            got = self.remote.fs.cat(paths, on_error="return")
        return [None if isinstance(got.get(p), BaseException) else got.get(p) for p in paths]

    def tar_sizes(self, shards: list[FinishedShard] | None = None) -> dict[str, int]:
        """Size of every `*.tar` of the folder (one listing on an object store), or of the tars of
        `shards` only, by location; a missing tar has none."""
        if shards is not None:
            return {s.tar: size for s in shards if (size := self._size(s.tar)) is not None}
        if not self.remote:
            return {str(p): p.stat().st_size for p in self.local.glob("*.tar")}
        with store_errors(self.remote.url):
            listing = self.remote.fs.ls(self.remote.path("").rstrip("/"), detail=True, refresh=True)
        sizes = {}
        for entry in listing:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(".tar") and entry.get("type") != "directory":
                sizes[self.where(name)] = int(entry["size"])
        return sizes

    def _size(self, location: str) -> int | None:
        try:
            if not self.remote:
                return Path(location).stat().st_size
            with store_errors(location):
                return int(self.remote.fs.size(location))
        except FileNotFoundError:
            return None

    def tars_without_stats(self, listed: list[FinishedShard], sizes: dict[str, int]) -> list[tuple[str, str]]:
        """`NNNNNN.tar` files that no readable stats file describes (a killed writer, a hand-copied
        tar, a corrupt stats file), as (location, reason): they are not registered, and say so."""
        known = {s.tar for s in listed}
        names = set(self._names())
        missing = []
        for tar in sorted(sizes):
            stem = tar.rsplit("/", 1)[-1][: -len(".tar")]
            if tar in known or not stem.isdigit():
                continue
            reason = ("stats file unreadable" if f"{stem}{_STATS}" in names
                      else "no stats file (unfinished, or not written by blip3)")
            missing.append((tar, reason))
        return missing

    def sha256(self, tar: str) -> str:
        """Re-hash one tar (a full read)."""
        if not self.remote:
            return file_sha256(tar)
        with store_errors(tar):
            return remote_sha256(self.remote.fs, tar)

    def sidecars(self, shards: list[FinishedShard]) -> pa.Table:
        """The sidecar rows of `shards` with a `shard` column (the tar's location), for an object
        store, where DuckDB cannot read the parquet files itself (local folders are read by DuckDB)."""
        columns = [c for c in SIDECAR_COLUMNS if c != "caption"]
        tables = []
        for s in shards:
            with store_errors(s.parquet), self.remote.fs.open(s.parquet, "rb") as f:
                t = pq.read_table(f, columns=columns)
            tables.append(t.append_column("shard", pa.array([s.tar] * t.num_rows, pa.string())))
        return pa.concat_tables(tables)


def remote_sha256(fs, location: str) -> str:
    h = hashlib.sha256()
    with fs.open(location, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# -- one shard file anywhere: what `mix build` checks of a catalogued shard ----------------------
def _remote_file(location: str, storage_options: dict[str, Any] | None) -> tuple[RemoteDir, str]:
    parent, _, name = str(location).rpartition("/")
    return RemoteDir(parent, storage_options), name


def location_size(location: str | Path, storage_options: dict[str, Any] | None = None) -> int | None:
    """The size of a file (a local path or an object-store URL); None when there is none."""
    if not is_remote(location):
        path = Path(location)
        return path.stat().st_size if path.is_file() else None
    folder, name = _remote_file(str(location), storage_options)
    with store_errors(str(location)):
        return folder.size(name)


def location_sha256(location: str | Path, storage_options: dict[str, Any] | None = None) -> str:
    """Re-hash a file (a full read), local or on an object store."""
    if not is_remote(location):
        return file_sha256(location)
    folder, name = _remote_file(str(location), storage_options)
    with store_errors(str(location)):
        return remote_sha256(folder.fs, folder.path(name))


@contextlib.contextmanager
def open_location(location: str | Path, storage_options: dict[str, Any] | None = None) -> Iterator[BinaryIO]:
    """A file opened for reading, local or on an object store (streamed, not downloaded first)."""
    if not is_remote(location):
        with open(location, "rb") as f:
            yield f
        return
    folder, name = _remote_file(str(location), storage_options)
    with store_errors(str(location)):
        f = folder.fs.open(folder.path(name), "rb")
    with f:
        yield f


def open_folder(location: str | Path, storage_options: dict[str, Any] | None = None) -> ShardFolder:
    """`location` as a ShardFolder; a missing one is a UserError naming it."""
    folder = ShardFolder(location, storage_options)
    if not folder.exists():
        raise UserError("not a directory" if folder.local else "no such folder on the store", file=folder.location)
    return folder
