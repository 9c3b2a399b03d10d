"""WebDataset shard I/O: the one place every stage writes and reads shards.

Layout of an output folder, img2dataset's (tools written for img2dataset output read ours):

    00000.tar          members `<key>.<ext>`: the image, `<key>.txt` caption, `<key>.json` record
    00000.parquet      one row per *input* sample, failures included: img2dataset's columns (`key`,
                       `url`, `caption`, `status`, `error_message`, `width`, `height`,
                       `original_width`, `original_height`, `sha256`) plus ours (counts, confidence)
    00000_stats.json   img2dataset's keys (`count`, `successes`, `failed_to_download`,
                       `failed_to_resize`, `duration`, `start_time`, `end_time`, `status_dict`) plus
                       ours (`failed`, tar `sha256`/`tar_bytes`, `generator`); written last = the
                       completion mark

The shard-name width (img2dataset's `oom_shard_count`, default 5 digits) is a writer setting;
readers take any width (they go by the stats files present).

Atomicity: the tar and the parquet are written under temporary names, fsynced and renamed; the
stats file, which carries the tar's sha256, is renamed into place last. A shard is complete only
when its stats file exists and the tar on disk matches the recorded size (and checksum, when asked).
A crash therefore never leaves a `NNNNNN.tar` that passes for finished, and re-running a job can
skip complete shards and redo the rest.

Tars are deterministic (fixed mtime, owner and mode), so the same input gives the same bytes.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from blip3.core.errors import UserError
from blip3.core.keys import is_safe_key
from blip3.core.storage import RemoteDir, local_path

#: Digits of a shard name, img2dataset's default (`oom_shard_count=5`): `00000.tar`.
SHARD_DIGITS = 5
#: Member extensions that hold an image, in the order a reader prefers them when a sample has
#: several (the one list: datagen's inputs, the record kinds, the loader and the audit use it).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
_EXT = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")

#: Columns of the sidecar parquet, one row per input sample (failures included).
SIDECAR_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("uid", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),  # the `.txt` member (null for failures)
        ("status", pa.string()),  # "success" | "failed"
        ("error_message", pa.string()),  # failure reason `reason: detail`, null on success
        ("width", pa.int32()),  # stored image size (after any conversion)
        ("height", pa.int32()),
        ("original_width", pa.int32()),  # size of the input image as stored in its file
        ("original_height", pa.int32()),
        ("sha256", pa.string()),  # of the stored image member (img2dataset's compute_hash)
        ("image_bytes", pa.int64()),  # size of the stored image member
        ("caption_length", pa.int32()),  # characters of the default caption (`.txt`)
        ("n_captions", pa.int32()),  # caption variants stored in the json
        ("n_ocr", pa.int32()),  # OCR entries kept
        ("n_objects", pa.int32()),  # grounded objects kept
        ("mean_confidence", pa.float32()),  # mean OCR/detector confidence of kept entries
        ("has_source_caption", pa.bool_()),
    ]
)
SIDECAR_COLUMNS = [f.name for f in SIDECAR_SCHEMA]


@dataclass(slots=True)  # slots: a misspelt column (`row.error = ...`) is an error, not a silent new attribute
class SampleRow:
    """One row of the sidecar parquet."""

    key: str
    status: str = "success"
    error_message: str | None = None
    uid: str | None = None
    url: str | None = None
    caption: str | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    sha256: str | None = None
    image_bytes: int | None = None
    caption_length: int | None = None
    n_captions: int | None = None
    n_ocr: int | None = None
    n_objects: int | None = None
    mean_confidence: float | None = None
    has_source_caption: bool | None = None


@dataclass
class ShardInfo:
    """What the stats file says about a finished shard."""

    index: int
    tar: Path
    parquet: Path
    stats: Path
    sha256: str
    tar_bytes: int
    count: int
    successes: int
    failed: int
    generator: dict[str, Any] = field(default_factory=dict)
    failure_reasons: dict[str, int] = field(default_factory=dict)


def shard_name(index: int, digits: int = SHARD_DIGITS) -> str:
    return f"{index:0{digits}d}"


def shard_paths(out_dir: str | Path, index: int | str, digits: int = SHARD_DIGITS) -> tuple[Path, Path, Path]:
    """(tar, parquet, stats) paths of shard `index` (or of the shard named `index`) in `out_dir`."""
    out = Path(out_dir)
    name = index if isinstance(index, str) else shard_name(index, digits)
    return out / f"{name}.tar", out / f"{name}.parquet", out / f"{name}_stats.json"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _error_reason(error: str | None) -> str:
    """Group failure messages by their leading reason (text before the first colon)."""
    if not error:
        return "unknown"
    return error.split(":", 1)[0].strip()[:80] or "unknown"


#: Failure reasons counted as img2dataset's `failed_to_download` (the bytes never arrived) and
#: `failed_to_resize` (the bytes are not a usable image); other failures (annotator verdicts such
#: as `no_text`) count only in `failed`.
DOWNLOAD_REASONS = frozenset({"download", "read", "no_image"})
DECODE_REASONS = frozenset({"empty", "decode", "too_large", "too_small"})


#: The fixed fields of a member header (GNU format, as `tarfile` writes it for our members: mode
#: 0644, uid/gid 0, mtime 0, empty user and group names, a regular file), either side of the name,
#: size and checksum; see `_member_header`.
_HEADER_MODE_IDS = b"0000644\x000000000\x000000000\x00"
_HEADER_MTIME = b"00000000000\x00"
_HEADER_TAIL = tarfile.REGTYPE + b"\x00" * 100 + tarfile.GNU_MAGIC + b"\x00" * (32 + 32 + 8 + 8 + 155 + 12)
_HEADER_FIXED_SUM = 256 + sum(_HEADER_TAIL)  # 256: the checksum field counted as 8 blanks
_MAX_SHORT_SIZE = 8**11  # sizes from here on need tarfile's base-256 form


def _member_header(name: str, size: int) -> bytes:
    """The header block(s) of one tar member: the same bytes as `tarfile.TarFile.addfile` in
    GNU format (tests compare them), built directly for the common case (a name of at most 100
    bytes), which costs a fifth of tarfile's generic path (a TarInfo copy and a field-by-field
    encode per member); other names and huge sizes go through tarfile itself."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > tarfile.LENGTH_NAME or size >= _MAX_SHORT_SIZE:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o644
        info.uname = info.gname = ""
        return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    head = raw.ljust(tarfile.LENGTH_NAME, b"\x00") + _HEADER_MODE_IDS + b"%011o\x00" % size + _HEADER_MTIME
    checksum = _HEADER_FIXED_SUM + sum(head)
    return b"".join((head, b"%06o\x00 " % checksum, _HEADER_TAIL))


class _HashingFile:
    """A write-only file wrapper that hashes and counts what passes through it, so a shard's sha256
    comes from the write itself (hash once) instead of a second full read of the tar."""

    def __init__(self, f):
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self.size


class ShardWriter:
    """Write one shard: stream members into a temporary tar, then publish tar, parquet, stats.

    Use as a context manager; leaving the block with an exception discards everything.

        with ShardWriter(out, 0, generator={"name": "ocr", "engine": "rapidocr"}) as w:
            w.add(key, {"jpg": jpeg, "txt": caption.encode(), "json": record}, SampleRow(key, ...))
            w.add_failure(SampleRow(key2, status="failed", error_message="decode: cannot identify image"))
    """

    def __init__(self, out_dir: str | Path, index: int, *, generator: dict[str, Any] | None = None,
                 digits: int = SHARD_DIGITS):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.index = index
        self.name = shard_name(index, digits)
        self.generator = dict(generator or {})
        self.tar_path, self.parquet_path, self.stats_path = shard_paths(self.out_dir, self.name)
        self._tmp_tar = self.tar_path.with_name(f".{self.tar_path.name}.tmp-{os.getpid()}")
        self._tmp_parquet = self.parquet_path.with_name(f".{self.parquet_path.name}.tmp-{os.getpid()}")
        self._file = open(self._tmp_tar, "wb")
        self._hashed = _HashingFile(self._file)
        self._rows: list[SampleRow] = []
        self._keys: set[str] = set()
        self._started = time.time()
        self._closed = False

    # -- writing -----------------------------------------------------------------------------
    def add(self, key: str, members: dict[str, bytes | str | dict], row: SampleRow) -> bool:
        """Add a successful sample; returns False (and records a failure) for a duplicate key."""
        if not is_safe_key(key):
            raise ValueError(f"unsafe shard key {key!r}: pass it through core.keys.sanitize_key")
        if key in self._keys:
            row.status, row.error_message = "failed", f"duplicate key: {key} already in shard"
            self._rows.append(row)
            return False
        self._keys.add(key)
        for ext, value in members.items():
            if not _EXT.match(ext):
                raise ValueError(f"bad member extension {ext!r} for key {key!r}")
            data = _to_bytes(value)
            pad = -len(data) % tarfile.BLOCKSIZE
            self._hashed.write(b"".join((_member_header(f"{key}.{ext}", len(data)), data, b"\x00" * pad)))
        row.key = key
        row.status = "success"
        self._rows.append(row)
        return True

    def add_failure(self, row: SampleRow) -> None:
        """Record an input sample that produced no member; `row.error_message` says why."""
        row.status = "failed"
        if not row.error_message:
            raise ValueError("a failed sample needs an error reason")
        self._rows.append(row)

    @property
    def rows(self) -> list[SampleRow]:
        return list(self._rows)

    # -- publishing --------------------------------------------------------------------------
    def close(self, extra_stats: dict[str, Any] | None = None) -> ShardInfo:
        """Publish the shard atomically and return its info; when publishing fails (a full disk),
        the temporary files are removed, so a failed run leaves nothing taking up the space."""
        if self._closed:
            raise RuntimeError("shard already closed")
        self._closed = True
        try:
            return self._publish(extra_stats)
        except OSError as e:
            self._discard()
            raise _naming(e, self.out_dir) from e
        except BaseException:
            self._discard()
            raise

    def _end_tar(self) -> None:
        """tarfile's end of archive: two zero blocks, then zeros up to a whole record (20 blocks)."""
        end = self._hashed.size + 2 * tarfile.BLOCKSIZE
        self._hashed.write(b"\x00" * (2 * tarfile.BLOCKSIZE + -end % tarfile.RECORDSIZE))

    def _publish(self, extra_stats: dict[str, Any] | None) -> ShardInfo:
        self._end_tar()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

        table = rows_to_table(self._rows)
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        tmp_parquet = self._tmp_parquet
        with open(tmp_parquet, "wb") as f:
            f.write(buf.getvalue().to_pybytes())
            f.flush()
            os.fsync(f.fileno())

        sha, size = self._hashed.sha.hexdigest(), self._hashed.size
        os.replace(self._tmp_tar, self.tar_path)
        os.replace(tmp_parquet, self.parquet_path)
        # img2dataset's status_dict: "success" and each failure reason, with their counts
        status = Counter("success" if r.status == "success" else _error_reason(r.error_message) for r in self._rows)
        successes = status["success"]
        reasons = {k: n for k, n in status.items() if k != "success"}
        finished = time.time()
        stats = {
            "shard": self.name,
            "tar": self.tar_path.name,
            "parquet": self.parquet_path.name,
            "sha256": sha,
            "tar_bytes": size,
            "count": len(self._rows),
            "successes": successes,
            "failed_to_download": sum(n for r, n in reasons.items() if r in DOWNLOAD_REASONS),
            "failed_to_resize": sum(n for r, n in reasons.items() if r in DECODE_REASONS),
            "failed": len(self._rows) - successes,
            "status_dict": dict(sorted(status.items())),
            "start_time": self._started,
            "end_time": finished,
            "duration": round(finished - self._started, 4),
            "generator": self.generator,
        }
        if extra_stats:
            stats.update(extra_stats)
        _atomic_write_bytes(self.stats_path, json.dumps(stats, indent=2).encode())
        _fsync_dir(self.out_dir)
        return _info_from_stats(self.out_dir, stats)

    def abort(self) -> None:
        """Drop everything written so far; nothing appears under the final names."""
        if self._closed:
            return
        self._closed = True
        self._discard()

    def _discard(self) -> None:
        """Remove the temporary files. Closing may fail again (the disk that made the writer fail is
        still full); that must not keep the files, and the first error is the one the caller sees."""
        with contextlib.suppress(OSError):
            self._file.close()
        self._tmp_tar.unlink(missing_ok=True)
        self._tmp_parquet.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            if isinstance(exc, OSError) and exc.filename is None:
                raise _naming(exc, self.out_dir) from exc
        elif not self._closed:
            self.close()


def _naming(e: OSError, where: Path) -> OSError:
    """`e` with a file name: a write that fails at a buffer flush (a full disk) has none, and
    "no space left" is only useful with the disk it is about."""
    if e.filename is not None or e.errno is None:  # no errno: an error raised by hand, keep its words
        return e
    return OSError(e.errno, e.strerror, str(where))


def _to_bytes(value: bytes | str | dict | list) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")


def rows_to_table(rows: Iterable[SampleRow]) -> pa.Table:
    """Column by column: `dataclasses.asdict` per row (a deep copy of each) cost as much as
    the parquet write itself."""
    rows = list(rows)
    return pa.Table.from_pydict({c: [getattr(r, c) for r in rows] for c in SIDECAR_COLUMNS}, schema=SIDECAR_SCHEMA)


def _info_from_stats(out_dir: Path, stats: dict[str, Any]) -> ShardInfo:
    tar, parquet, stats_path = shard_paths(out_dir, str(stats["shard"]))
    return ShardInfo(
        index=int(stats["shard"]),
        tar=tar,
        parquet=parquet,
        stats=stats_path,
        sha256=stats["sha256"],
        tar_bytes=int(stats["tar_bytes"]),
        count=int(stats["count"]),
        successes=int(stats["successes"]),
        failed=int(stats["failed"]),
        generator=stats.get("generator", {}),
        failure_reasons={k: v for k, v in stats.get("status_dict", {}).items() if k != "success"},
    )


# -- reading -----------------------------------------------------------------------------------
def read_stats(out_dir: str | Path | RemoteDir, index: int, digits: int = SHARD_DIGITS) -> dict[str, Any] | None:
    if isinstance(out_dir, RemoteDir):
        data = out_dir.read_bytes(f"{shard_name(index, digits)}_stats.json")
        try:
            return None if data is None else json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
    _, _, stats_path = shard_paths(out_dir, index, digits)
    try:
        return json.loads(stats_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def shard_complete(out_dir: str | Path | RemoteDir, index: int, *, verify_checksum: bool = True,
                   digits: int = SHARD_DIGITS) -> bool:
    """True when shard `index` was published whole (stats present, tar size and, when
    `verify_checksum`, sha256 match; without it the stats' sha256 is trusted: hash once)."""
    stats = read_stats(out_dir, index, digits)
    if stats is None:
        return False
    if isinstance(out_dir, RemoteDir):
        return _remote_shard_complete(out_dir, shard_name(index, digits), stats, verify_checksum)
    tar, parquet, _ = shard_paths(out_dir, index, digits)
    if not tar.exists() or not parquet.exists() or tar.stat().st_size != stats.get("tar_bytes"):
        return False
    return not verify_checksum or file_sha256(tar) == stats.get("sha256")


def _remote_shard_complete(out: RemoteDir, name: str, stats: dict[str, Any], verify_checksum: bool) -> bool:
    if out.size(f"{name}.parquet") is None or out.size(f"{name}.tar") != stats.get("tar_bytes"):
        return False
    if not verify_checksum:
        return True
    h = hashlib.sha256()
    with out.fs.open(out.path(f"{name}.tar"), "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest() == stats.get("sha256")


def publish_remote(local_dir: Path, out: RemoteDir, index: int, digits: int = SHARD_DIGITS) -> None:
    """Upload a shard written (and published) in `local_dir`: tar, parquet, then the stats object,
    the completion mark, last; a run killed in between leaves a shard that does not count as done."""
    for path in shard_paths(local_dir, index, digits):
        out.upload(path, path.name)


def remove_remote_shards(out: RemoteDir, keep_below: int = 0, digits: int = SHARD_DIGITS) -> list[int]:
    """`datagen.pipeline`'s removal of left-over shards, on an object store: stats objects first."""
    stems = set()
    for name in out.names():
        for suffix in ("_stats.json", ".tar", ".parquet"):
            stem = name[: -len(suffix)] if name.endswith(suffix) else ""
            if stem.isdigit() and (int(stem) >= keep_below or len(stem) != digits):
                stems.add(stem)
    for stem in stems:
        for suffix in ("_stats.json", ".parquet", ".tar"):
            out.remove(f"{stem}{suffix}")
    return sorted(int(n) for n in stems)


def list_shards(out_dir: str | Path) -> list[ShardInfo]:
    """Finished shards of an output folder, by index (unfinished temp files are ignored)."""
    out = Path(out_dir)
    infos = []
    for stats_path in sorted(out.glob("*_stats.json")):
        stem = stats_path.name[: -len("_stats.json")]
        if not stem.isdigit():
            continue
        try:
            infos.append(_info_from_stats(out, json.loads(stats_path.read_text())))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            continue  # not a finished shard's stats; callers that must account for tars check them
    return infos


def is_shard_folder(path: Path) -> bool:
    """True for a folder written by `ShardWriter` (finished shards with their stats files)."""
    if not path.is_dir():
        return False
    try:
        return bool(list_shards(path))
    except (KeyError, ValueError, TypeError):  # someone else's *_stats.json (img2dataset's)
        return False


def resolve_shards(spec: str | Path, base: Path | None = None) -> list[Path]:
    """Tars named by a folder (its finished shards if written by us, else its `*.tar`, else
    recursively), a file, a glob or a brace pattern; each tar once, in the order first named (a
    glob overlapping a name, or a link to a tar also named, does not make its samples count twice)."""
    from braceexpand import braceexpand

    text = str(spec)
    paths: list[Path] = []
    for part in braceexpand(text):
        p = local_path(part, "shards")
        if base is not None and not p.is_absolute():
            p = base / p
        if any(c in part for c in "*?["):
            paths += [Path(x) for x in sorted(glob.glob(str(p), recursive=True)) if x.endswith(".tar")]
        elif p.is_dir() and is_shard_folder(p):  # only finished shards (a stats file marks them)
            paths += [info.tar for info in list_shards(p)]
        elif p.is_dir():
            paths += sorted(p.glob("*.tar")) or sorted(p.rglob("*.tar"))
        elif p.is_file():
            paths.append(p)
        else:
            raise UserError("no such file or folder", file=p)
    if not paths:
        raise UserError("no .tar shards found", file=text)
    return list(dict.fromkeys(p.resolve() for p in paths))


def clean_temporaries(out_dir: str | Path) -> int:
    """Remove leftovers of killed writers (`.NNNNNN.tar.tmp-*`); returns how many."""
    n = 0
    for p in Path(out_dir).glob(".*.tmp-*"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/key.ext.more` -> (`dir/key`, `ext.more`), the webdataset convention."""
    head, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{head}/{key}" if head else key), ext


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The tar's members in order, without keeping them: iterating a TarFile appends every header
    to `tar.members`, so indexing a 200k-member input tar would hold 200k TarInfo objects in the
    job's driver. Only regular members are read afterwards, which needs no earlier header."""
    while (member := tar.next()) is not None:
        tar.members.clear()
        yield member


def _keyed_files(tar: tarfile.TarFile, skipped: list[tarfile.TarInfo] | None = None
                 ) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(key, ext, member) for each regular file, in tar order: consecutive equal keys form a sample.

    Links and device entries carry no data of their own; they are passed over, and appended to
    `skipped` when given so a reader that must account for every input can report them."""
    for member in _members(tar):
        if member.size < 0:  # tarfile takes a signed size field; a reader would read to the end
            raise tarfile.ReadError(f"member {member.name!r} has a negative size")
        if member.isfile():
            key, ext = split_member_name(member.name)
            yield key, ext, member
        elif skipped is not None and not member.isdir():
            skipped.append(member)


class MemberSpan(NamedTuple):
    """One member of a sample: its extension and where its data lies in the tar file."""

    ext: str
    offset: int
    size: int


@dataclass(frozen=True)
class SampleIndex:
    """Where one sample's members live in its tar: key and its members in tar order."""

    key: str
    members: tuple[MemberSpan, ...]
    #: where the sample's first header starts (extended headers included): a scan can resume here
    header: int = field(default=0, compare=False)


def iter_tar_index(path: str | Path, *, skipped: list[tarfile.TarInfo] | None = None,
                   fileobj: BinaryIO | None = None, start: int = 0) -> Iterator[SampleIndex]:
    """Samples of an uncompressed tar in order, by reading headers only (data is seeked over), so a
    reader can later fetch just the members it needs. `tarfile.TarError` / `OSError` pass through
    unchanged: each caller words them for its own user. Non-regular members (hard and symbolic
    links, devices) are not samples; they are appended to `skipped` when it is given.

    `fileobj` reads the tar from an open (seekable) file instead of `path`, e.g. an object-store
    file; `start`, a sample's `header`, resumes the scan there instead of at the first member."""
    with contextlib.ExitStack() as stack:
        f = fileobj if fileobj is not None else stack.enter_context(open(path, "rb"))
        f.seek(start)
        tar = stack.enter_context(tarfile.open(fileobj=f, mode="r:"))
        for key, group in groupby(_keyed_files(tar, skipped), key=itemgetter(0)):
            members = list(group)
            yield SampleIndex(key, tuple(MemberSpan(ext, m.offset_data, m.size) for _, ext, m in members),
                              header=members[0][2].offset)


def is_image_ext(ext: str) -> bool:
    """`jpg`, or an interleaved member name like `img0.jpg` (the last dotted part decides)."""
    return ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTS


def read_span(f: BinaryIO, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of an open tar: a member's data, located by `iter_tar_index`."""
    f.seek(offset)
    return f.read(size)


def read_members(f: BinaryIO, sample: SampleIndex) -> dict[str, bytes]:
    """All members of a sample, by extension: they are adjacent in the tar, so one read, then slices."""
    start = sample.members[0].offset
    span = memoryview(read_span(f, start, max(m.offset + m.size for m in sample.members) - start))
    return {m.ext: bytes(span[m.offset - start: m.offset - start + m.size]) for m in sample.members}


def iter_shard(path: str | Path, fileobj: BinaryIO | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one tar as webdataset yields them: `{"__key__", "__url__", ext: bytes, ...}`;
    read from `fileobj` when given (a tar on an object store, opened by the caller)."""
    with tarfile.open(None if fileobj is not None else path, mode="r|*", fileobj=fileobj) as tar:
        for key, group in groupby(_keyed_files(tar), key=itemgetter(0)):
            sample: dict[str, Any] = {"__key__": key, "__url__": str(path)}
            for _, ext, member in group:  # streaming: read each member before the next header
                f = tar.extractfile(member)
                sample[ext] = f.read() if f is not None else b""
            yield sample


def read_sidecar(path: str | Path) -> pa.Table:
    return pq.read_table(path)
