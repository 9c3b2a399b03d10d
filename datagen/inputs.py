"""Input kinds of a datagen job, enumerated in a stable order with safe, unique keys.

A job's input is one of (detected from the path, or named with `--input-format`):

- `folder`       a folder of images, recursive; files sorted by relative path. A `name.txt` beside
                 `name.jpg` is taken as the image's source caption (img2dataset's habit). The
                 relative path is kept as `source_path` in each sample's record (lineage).
- `webdataset`   WebDataset tars: one `.tar`, a brace pattern (`shards/{000000..000009}.tar`), or
                 a folder holding `.tar` files. `<key>.txt` is the source caption, `<key>.json`
                 may carry `uid`/`url`.
- `img2dataset`  an img2dataset output folder: its `NNNNN.parquet` lists every URL it tried
                 (failures with `error_message` become failed samples with a `download:` reason),
                 its tars hold the images.
- `urls`         a parquet / CSV / TSV / JSONL of URLs (`url`, optional `caption`, optional `uid`),
                 read row by row; each row's image is fetched by the task writing its shard
                 (see `fetch.py`), nothing is downloaded beforehand. Keys are the row numbers.
- `blip3-ocr`    a parquet in the published BLIP3-OCR shape (`uid`, `url`, `captions` JSON,
                 `metadata` JSON): fetched like `urls`, keeping `uid` (the
                 captions are made anew by our engine; `blip3 export blip3-ocr` writes this shape).

Each kind is one reader class in `READERS` (`InputReader`: its tars, counted on the cluster, or
its refs, listed by the driver), working the same on a local path and on any fsspec location
(`core.storage.Location`: `s3://bucket/images/`, a brace pattern of `gs://` tars, ...). A new input
kind is one class here, plus its name in `core.options.InputFormat` (a test checks the two agree)
and, when it can be told from the location alone, a line in `detect_format`.

Enumeration happens in two steps so that a job can be sharded deterministically without holding
image bytes: `iter_refs` yields light `SampleRef`s (a locator, not the bytes) in a stable order,
and `load_sample(ref)` reads the bytes wherever the work runs (a Ray actor). `iter_samples` does
both for callers who just want `InputSample`s.

Keys: the raw name (relative path, tar member key, img2dataset key) goes through
`core.keys.sanitize_key`; a key already seen gets `_1`, `_2`, ... appended in enumeration order,
so the same input always gives the same keys and no key can name a path outside the output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tarfile
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from blip3.core.errors import UserError, describe_exception
from blip3.core.keys import sanitize_key
from blip3.core.storage import Location, as_location, stamp_of, staged_input
from blip3.core.shards import IMAGE_EXTS, MemberSpan, is_image_ext, iter_tar_index, read_span, split_member_name

URL_LIST_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".json")


@dataclass
class InputSample:
    """One input image with what the source says about it.

    `error` is set (and `image` empty) for a sample that failed before we saw it, e.g. a URL
    img2dataset could not download; the pipeline records it as a failed row with that reason.
    """

    key: str
    image: bytes
    ext: str
    uid: str | None = None
    url: str | None = None
    source_caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class SampleRef:
    """Where an input sample's bytes are, without the bytes.

    `locator` is `["at", Location]` (a whole file), `["at", Location, offset, size]` (a tar
    member), `["url", url]` (fetched by `load_sample`) or `["none"]` (pre-failed); the `Location`
    is local or on any store, and pickles without its connection. Refs serialise to JSON
    (`to_json`/`from_json`).
    """

    key: str
    ext: str
    locator: list[Any]
    uid: str | None = None
    url: str | None = None
    source_caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    #: what changes when the input's bytes do, at the cost of a stat: `size:mtime_ns` of a file,
    #: `size:ETag` of an object (core.storage.stamp_of); part of the shard's input digest
    stamp: str | None = None

    def to_json(self) -> str:
        data = asdict(self)
        if self.locator and self.locator[0] == "at":
            where = self.locator[1]
            data["locator"] = ["at", {"url": where.url, "storage_options": where.storage_options}, *self.locator[2:]]
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "SampleRef":
        ref = cls(**json.loads(text))
        if ref.locator and ref.locator[0] == "at":
            where = ref.locator[1]
            ref.locator = ["at", Location(where["url"], where["storage_options"]), *ref.locator[2:]]
        return ref


# -- detection ---------------------------------------------------------------------------------
def _suffix(name: str) -> str:
    return "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""


def detect_format(input_path: str | Path | Location, storage_options: dict[str, Any] | None = None) -> str:
    """Guess the input kind from the location (local or on any store); raises UserError when it
    cannot tell."""
    text = str(input_path)
    if "{" in text and "}" in text:
        return "webdataset"
    where = as_location(input_path, storage_options)
    suffix = _suffix(where.name)
    if suffix == ".tar":
        return "webdataset"
    if suffix in URL_LIST_SUFFIXES and where.is_file():
        if suffix != ".parquet":
            return "urls"
        import pyarrow.parquet as pq

        with where.open() as f:
            names = set(pq.read_schema(f).names)
        if {"captions", "metadata", "url"} <= names:
            return "blip3-ocr"
        if "url" in names:
            return "urls"
        raise UserError("parquet has no `url` column; cannot use it as an input", field="url", file=where.url)
    listing = where.listing()
    if not listing and where.exists():  # an empty local folder: a folder input with no images
        return "folder"
    if not listing:
        if where.is_file():
            raise UserError(f"cannot tell the input kind; pass --input-format ({', '.join(INPUT_FORMATS)})",
                            file=where.url)
        raise UserError("input does not exist (or is an empty folder)", file=where.url)
    if any(n.endswith(".tar") for n in listing):
        _refuse_mixed_folder(where)
        return "img2dataset" if _is_img2dataset_dir(where) else "webdataset"
    return "folder"


def _refuse_mixed_folder(where: Location) -> None:
    """A folder holding both tars and loose images is ambiguous: taking it as tars would silently
    drop the images (and a job writing its shards into its own input folder looks just like it),
    so the user must say which one they mean."""
    loose = next((rel for rel in sorted(where.find()) if _ext_of(rel) in IMAGE_EXTS), None)
    if loose is not None:
        raise UserError(
            f"holds both .tar files and loose images (e.g. {loose}); pass "
            "--input-format folder (the loose images) or --input-format webdataset (the tars)",
            file=where.url,
        )


def check_output_outside_input(input_path: str | Path, output_dir: str | Path | Location) -> None:
    """Refuse an output folder that is, or lies inside, a folder input: the job's own shards would
    become input on the next run (or be mistaken for it), so inputs could be dropped or doubled."""
    text = str(input_path)
    if "{" in text:
        return
    src, out = Location(text).url, as_location(output_dir).url
    if out == src or out.startswith(src.rstrip("/") + "/"):
        raise UserError(f"output {out} is inside the input folder; choose an output outside it",
                        file=src, field="--output")


def _is_img2dataset_dir(where: Location) -> bool:
    """img2dataset writes `NNNNN.parquet` with an `error_message` column beside each tar. Our own
    outputs carry its columns too, plus ours (`n_captions`): they are read as WebDataset tars, whose
    `.json` tells our caption (`.txt`) from the source caption."""
    import pyarrow.parquet as pq

    for parquet in sorted(n for n in where.names() if n.endswith(".parquet")):
        try:
            with where.open(parquet) as f:
                names = pq.read_schema(f).names
        except Exception:  # an unreadable parquet is not img2dataset's; treat the dir as plain tars
            return False
        if "error_message" in names:
            return "n_captions" not in names
    return False


# -- enumeration -------------------------------------------------------------------------------
class _KeyDeduper:
    """Sanitise raw keys and make them unique in enumeration order."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, raw: str) -> str:
        base = sanitize_key(raw)
        key, n = base, 0
        while key in self.seen:
            n += 1
            key = f"{base}_{n}"
        self.seen.add(key)
        return key


def iter_refs(input_path: str | Path, input_format: str | None = None,
              storage_options: dict[str, Any] | None = None) -> Iterator[SampleRef]:
    """Yield the input's samples as refs, in a stable order, with sanitised unique keys.

    Keys are unique over the whole input; the datagen pipeline, which must not hold every key of
    a large job, uses `iter_raw_refs` and makes keys unique per shard instead (datagen.plans).
    """
    dedup = _KeyDeduper()
    for ref in iter_raw_refs(input_path, input_format, storage_options):
        ref.key = dedup(ref.key)
        yield ref


def iter_raw_refs(input_path: str | Path, input_format: str | None = None,
                  storage_options: dict[str, Any] | None = None) -> Iterator[SampleRef]:
    """`iter_refs` before key de-duplication: raw keys, not yet sanitised, in the same stable order."""
    reader = reader_for(input_path, input_format, storage_options)
    yield from reader.refs(as_location(input_path, storage_options))


def load_sample(ref: SampleRef, download: Any = None) -> InputSample:
    """Read the bytes a ref points at (in whichever process runs the work). A URL is fetched with
    `download` (a `datagen.fetch.DownloadOptions`, default settings when None); a URL that could not
    be fetched gives a sample with a `download:` error, not an exception."""
    kind = ref.locator[0]
    error = ref.error
    if kind == "url":
        from blip3.datagen.fetch import DownloadOptions, FetchError, fetch_url

        try:
            image = fetch_url(ref.locator[1], download or DownloadOptions())
        except FetchError as e:
            image, error = b"", f"download: {e}"
    elif kind == "at":
        where, *span = ref.locator[1:]
        where = as_location(where)
        image = where.read_range("", int(span[0]), int(span[1])) if span else where.read_bytes()
        if image is None:
            raise FileNotFoundError(f"no such file: {where.url}")
    elif kind == "none":
        image = b""
    else:
        raise ValueError(f"unknown locator {ref.locator!r}")
    return InputSample(
        key=ref.key, image=image, ext=ref.ext, uid=ref.uid, url=ref.url,
        source_caption=ref.source_caption, meta=dict(ref.meta), error=error,
    )


def iter_samples(input_path: str | Path, input_format: str | None = None) -> Iterator[InputSample]:
    """`iter_refs` + `load_sample`: the input's samples with their bytes, in order."""
    for ref in iter_refs(input_path, input_format):
        yield load_sample(ref)


def _ext_of(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


# -- tars --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TarSource:
    """One input tar, local or on any fsspec store (a path or URL is made a `Location`). Picklable,
    so a Ray task on any node reads the tar itself."""

    where: Location
    #: an img2dataset part's `NNNNN.parquet`: its rows, sorted by key, are the refs
    parquet: Location | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "where", as_location(self.where))
        if self.parquet is not None:
            object.__setattr__(self, "parquet", as_location(self.parquet))

    @property
    def name(self) -> str:
        return self.where.name

    def __str__(self) -> str:
        return self.where.url

    def open(self) -> BinaryIO:
        return self.where.open()

    def size(self) -> int:
        if self.parquet is not None:  # the tar may be missing (every row failed); both files count
            return (self.parquet.size() or 0) + (self.where.size() or 0)
        size = self.where.size()
        if size is None:
            raise FileNotFoundError(f"no such file: {self}")
        return size

    def scan(self, start: int = 0, headers: Any = None, fileobj: BinaryIO | None = None) -> Iterator[_TarSample]:
        """`scan_tar` of this tar, from the sample whose header is at byte `start`, through `fileobj`
        when the caller has the tar open already (tarfile seeks back to its headers itself)."""
        if fileobj is not None:
            yield from scan_tar(str(self), fileobj=fileobj, start=start, headers=headers)
            return
        try:
            f = self.open()
        except FileNotFoundError:
            raise UserError("not found", file=str(self)) from None
        with f:
            yield from scan_tar(str(self), fileobj=f, start=start, headers=headers)

    def locator(self, offset: int, size: int) -> list[Any]:
        return ["at", self.where, offset, size]


@dataclass
class _TarSample:
    key: str
    members: dict[str, MemberSpan] = field(default_factory=dict)  # by lower-cased ext, first wins
    extra_images: list[str] = field(default_factory=list)  # image members not taken (`key.ext`)
    image: str | None = None  # the extension (a `members` key) of the image member taken
    link: str | None = None  # set for a link member (`name -> target`): no data of its own
    header: int = 0  # byte offset of the sample's first header (a scan can resume there)

    @property
    def n_refs(self) -> int:
        """Refs this sample becomes (`_tar_sample_refs`): its own, plus one per image not taken."""
        return 1 if self.link is not None else 1 + len(self.extra_images)


def scan_tar(path: Path | str, *, fileobj: BinaryIO | None = None, start: int = 0,
             headers: Any = None) -> Iterator[_TarSample]:
    """Group a tar's members by webdataset key, keeping their data offsets (no data read).

    Every image member is accounted for: a second image under one key (a repeated `a.jpg`, or
    `a.jpg` beside `a.png`) is listed in `extra_images`, and an image member that is a hard or
    symbolic link comes last as a sample of its own with `link` set, so each becomes a failed row.
    `fileobj`, `start` and `headers` as for `core.shards.iter_tar_index`."""
    links: list[tarfile.TarInfo] = []
    try:
        for sample in iter_tar_index(path, skipped=links, fileobj=fileobj, start=start, headers=headers):
            yield _group_members(sample.key, sample.members, sample.header)
    except tarfile.TarError as e:
        raise UserError(f"not a readable tar: {e}", file=path) from e
    for member in links:
        key, ext = split_member_name(member.name)
        if _ext_of(member.name) in IMAGE_EXTS:
            kind = "hard link" if member.islnk() else "symbolic link" if member.issym() else "special file"
            yield _TarSample(key, link=f"{member.name!r} is a {kind}" + (f" to {member.linkname!r}" if member.linkname else ""))


def _group_members(key: str, spans: tuple[MemberSpan, ...], header: int = 0) -> _TarSample:
    """One key's members by extension. The image used is the first member of the preferred plain
    extension (`jpg`, `png`, ...), else the first whose last dotted part is one (`a.b.jpg` is key
    `a`, extension `b.jpg`, the webdataset way); every other image member is listed in
    `extra_images`, so it becomes a failed row, never silently dropped."""
    sample = _TarSample(key, header=header)
    for span in spans:
        sample.members.setdefault(span.ext.lower(), span)
    sample.image = next((e for e in IMAGE_EXTS if e in sample.members), None) or next(
        (e for e in sample.members if is_image_ext(e)), None)
    chosen = sample.members.get(sample.image) if sample.image else None
    sample.extra_images = [f"{key}.{m.ext}" for m in spans if is_image_ext(m.ext) and m is not chosen]
    return sample


def _tar_sample_refs(src: TarSource, f: BinaryIO, sample: _TarSample) -> Iterator[SampleRef]:
    """The refs of one tar sample: its own, then a failed one per image member not taken."""
    if sample.link is not None:
        yield SampleRef(key=sample.key, ext="", locator=["none"], meta={"shard": src.name},
                        error=f"tar_link: {sample.link}; links are not read as images")
        return
    yield _tar_sample_ref(src, f, sample)
    for name in sample.extra_images:
        yield SampleRef(key=sample.key, ext=_ext_of(name), locator=["none"], meta={"shard": src.name},
                        error=f"duplicate_member: {name!r} is a second image under key {sample.key!r} "
                              f"in {src.name}; only the first is used")


def _tar_sample_ref(src: TarSource, f: BinaryIO, sample: _TarSample, extra: dict[str, Any] | None = None) -> SampleRef:
    """The ref of one tar sample; its json/txt members are read through `f`, the open tar `src`."""
    image_ext = sample.image
    meta: dict[str, Any] = {"shard": src.name}
    record: dict[str, Any] = {}
    if "json" in sample.members:
        try:
            record = json.loads(read_span(f, sample.members["json"].offset, sample.members["json"].size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = {}
    caption = None
    if "txt" in sample.members:
        txt = sample.members["txt"]
        caption = read_span(f, txt.offset, txt.size).decode("utf-8", errors="replace").strip() or None
    if "captions" in record and "generator" in record:  # our own caption shard: `.txt` is our caption
        caption = record.get("source_caption")
    extra = extra or {}
    uid = extra.get("uid") or record.get("uid")
    url = extra.get("url") or record.get("url")
    caption = extra.get("caption") or caption or record.get("caption")
    if image_ext is None:
        return SampleRef(
            key=sample.key, ext="", locator=["none"], uid=_str_or_none(uid), url=_str_or_none(url),
            source_caption=caption, meta=meta, error=f"no_image: members {sorted(sample.members)}",
        )
    info = sample.members[image_ext]
    return SampleRef(
        key=sample.key, ext=image_ext.rsplit(".", 1)[-1], locator=src.locator(info.offset, info.size),
        uid=_str_or_none(uid), url=_str_or_none(url), source_caption=caption, meta=meta,
    )


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _tar_refs(tars: list[TarSource]) -> Iterator[SampleRef]:
    """Every ref of `tars`, in order (a listing in one process: jobs count tars on Ray instead)."""
    for src in tars:
        if src.parquet is not None:
            yield from _img2dataset_part_refs(src)
            continue
        try:
            f = src.open()
        except FileNotFoundError:
            raise UserError("not found", file=str(src)) from None
        with f:  # one open file for the headers and the json/txt members (tarfile seeks back itself)
            for sample in src.scan(fileobj=f):
                yield from _tar_sample_refs(src, f, sample)


# -- tars planned without the driver reading them (datagen.plans) ------------------------------
@dataclass
class TarCount:
    """What planning needs of one input tar, found by a task near the data (`count_tar`): how many
    refs it gives, its size (part of a shard's fingerprint), and `seeks`, (ref ordinal, header
    offset) pairs at least every `every` refs, where a scan for a later range may start; `error`
    says why the tar cannot be read."""

    refs: int = 0
    size: int = 0
    seeks: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0)])
    error: str | None = None
    #: sha256 of every member header (name, size, mtime, checksum), read while counting: a tar
    #: rewritten with other members, sizes or times gets another one, wherever it lies
    stamp: str = ""


def count_tar(src: TarSource, every: int) -> TarCount:
    """Count a tar's refs by reading its headers only (no member data). A tar holding links gets
    no seeks but the start: its links' refs come after all samples, so only a full scan finds them."""
    count = TarCount()
    headers = hashlib.sha256()
    try:
        count.size = src.size()
        if src.parquet is not None:  # an img2dataset part: one ref per parquet row, from its footer
            import pyarrow.parquet as pq

            with src.parquet.open() as f:
                count.refs = pq.read_metadata(f).num_rows
            count.stamp = f"{src.parquet.stamp()}|{src.where.stamp()}"
            return count
        for sample in src.scan(headers=headers):
            if count.refs >= count.seeks[-1][0] + every and sample.link is None:
                count.seeks.append((count.refs, sample.header))
            if sample.link is not None:
                count.seeks = [(0, 0)]
                every = 1 << 62
            count.refs += sample.n_refs
        count.stamp = headers.hexdigest()
    except UserError as e:
        count.error = str(e)
    except Exception as e:  # a missing object, no permission, a store out of reach: the driver says it in one line
        count.error = f"{src}: cannot read: {describe_exception(e)}"
    return count


def iter_tar_range(src: TarSource, start: int, stop: int, seek: tuple[int, int] = (0, 0),
                   size: int | None = None) -> Iterator[SampleRef]:
    """Refs `start .. stop-1` of one tar, numbered as `_tar_refs` yields them, with raw keys;
    the scan starts at `seek` (a `TarCount.seeks` pair at or before `start`), not at the top.
    An img2dataset part is read whole (its rows are sorted by key), then cut.

    The range comes from a count made earlier (`count_tar`): a tar whose `size` is no longer the
    counted one, or that holds fewer refs than counted, is a UserError, never a shard quietly
    short or built from a seek offset that now lands inside some member's data."""
    if size is not None and src.size() != size:
        raise UserError(f"changed since it was counted ({size} bytes then, {src.size()} now); re-run the job",
                        file=str(src))
    ordinal = start
    if src.parquet is not None:
        for ref in islice(_img2dataset_part_refs(src), start, stop):
            ordinal += 1
            yield ref
    else:
        ordinal = seek[0]
        with src.open() as f:
            for sample in src.scan(seek[1], fileobj=f):
                if ordinal + sample.n_refs <= start:
                    ordinal += sample.n_refs
                    continue
                for ref in _tar_sample_refs(src, f, sample):
                    if ordinal >= start:
                        yield ref
                    ordinal += 1
                    if ordinal >= stop:
                        return
    if ordinal < stop:
        raise UserError(f"holds {max(ordinal, start) - start} of the {stop - start} samples counted in its range "
                        f"{start}..{stop - 1}; re-run the job", file=str(src))


# -- img2dataset parts -------------------------------------------------------------------------
def _img2dataset_part_refs(part: TarSource) -> Iterator[SampleRef]:
    """Every URL img2dataset tried in one part, by key (= input order); its failures become failed refs."""
    import pyarrow.parquet as pq

    samples = {}
    if part.where.is_file():
        with part.open() as f:
            samples = {s.key: s for s in scan_tar(str(part), fileobj=f) if s.link is None}
    with part.open() if samples else contextlib.nullcontext() as f:
        with part.parquet.open() as pf:
            rows = pq.read_table(pf).to_pylist()
        # img2dataset writes rows in completion order; its keys follow the input order: sort by key.
        for row in sorted(rows, key=lambda r: str(r.get("key"))):
            key = str(row.get("key"))
            extra = {"uid": row.get("uid"), "url": row.get("url"), "caption": row.get("caption")}
            if f is not None and row.get("status") == "success" and key in samples:
                yield _tar_sample_ref(part, f, samples[key], extra)
            else:
                reason = row.get("error_message") or row.get("status") or "missing from tar"
                yield SampleRef(
                    key=key, ext="", locator=["none"], uid=_str_or_none(extra["uid"]), url=_str_or_none(extra["url"]),
                    source_caption=extra["caption"], meta={"shard": part.parquet.name}, error=f"download: {reason}",
                )


# -- the readers: one class per input kind -----------------------------------------------------
class InputReader:
    """One input kind. A reader either names the tars of its input (`tars`), which Ray tasks near
    the data count and the shards' tasks read (datagen.plans), or lists its refs in the driver
    (`refs`). Every method takes a `Location`, local or on any store."""

    name: str = ""

    def tars(self, where: Location) -> list[TarSource] | None:
        """The input's tars, or None for a kind listed by the driver."""
        return None

    def refs(self, where: Location) -> Iterator[SampleRef]:
        """The input's refs with raw keys, in a stable order."""
        yield from _tar_refs(self.tars(where) or [])


class FolderReader(InputReader):
    """A folder of images, recursive, sorted by relative path; `name.txt` beside `name.jpg` is the
    image's source caption; a dangling symbolic link is a failed ref."""

    name = "folder"

    def refs(self, where: Location) -> Iterator[SampleRef]:
        found = where.find()
        if not found and not where.exists():
            raise UserError("no such folder", file=where.url)
        for rel in sorted(found):
            if _ext_of(rel) not in IMAGE_EXTS:
                continue
            info, stem = found[rel], rel.rsplit(".", 1)[0]
            if info.get("dangling") is not None:
                yield SampleRef(key=stem, ext=_ext_of(rel), locator=["none"], meta={"path": rel},
                                error=f"dangling_symlink: {rel} points at {info['dangling']}, which does not exist")
                continue
            text = where.read_bytes(f"{stem}.txt") if f"{stem}.txt" in found else None
            caption = text.decode("utf-8", errors="replace").strip() if text else None
            yield SampleRef(key=stem, ext=_ext_of(rel), locator=["at", where.child(rel)], source_caption=caption or None,
                            meta={"path": rel}, stamp=stamp_of(info))


class WebDatasetReader(InputReader):
    """WebDataset tars: one `.tar`, a brace pattern, or a folder holding `.tar` files (sorted)."""

    name = "webdataset"

    def tars(self, where: Location) -> list[TarSource]:
        if "{" in where.url:  # a brace pattern: its tars in pattern order (existence: checked by their counts)
            from braceexpand import braceexpand

            return [TarSource(Location(url, where.storage_options)) for url in braceexpand(where.url)]
        if _suffix(where.name) == ".tar":
            return [TarSource(where)]
        names = sorted(n for n, e in where.listing().items() if n.endswith(".tar") and e.get("type") != "directory")
        if not names:
            raise UserError("no .tar shards found", file=where.url)
        return [TarSource(where.child(n)) for n in names]


class Img2DatasetReader(InputReader):
    """An img2dataset output folder: each `NNNNN.parquet` lists every URL it tried (failures become
    failed refs with a `download:` reason), its tar holds the images."""

    name = "img2dataset"

    def tars(self, where: Location) -> list[TarSource]:
        parquets = sorted(n for n in where.names() if n.endswith(".parquet") and n[: -len(".parquet")].isdigit())
        if not parquets:
            raise UserError("no img2dataset parquet files (NNNNN.parquet) found", file=where.url)
        return [TarSource(where.child(p[: -len(".parquet")] + ".tar"), parquet=where.child(p)) for p in parquets]


class UrlListReader(InputReader):
    """A parquet / CSV / TSV / JSONL / JSON list of URLs (`url`, optional `caption`, `uid`), one ref
    per row keyed by row number (img2dataset's habit); each row's image is fetched by the task
    writing its shard. A list on a store is read from a local copy. A non-http(s) URL is a failed
    ref, never opened."""

    name = "urls"

    def refs(self, where: Location) -> Iterator[SampleRef]:
        from blip3.datagen.fetch import iter_url_rows, scheme_error

        with staged_input(where, None, URL_LIST_SUFFIXES) as path:
            for number, row in enumerate(iter_url_rows(path)):
                refused = scheme_error(row["url"])
                yield SampleRef(key=f"{number:09d}", ext="", locator=["none"] if refused else ["url", row["url"].strip()],
                                uid=row["uid"], url=row["url"], source_caption=row["caption"] or None, error=refused)


class Blip3OcrReader(UrlListReader):
    """A parquet in the published BLIP3-OCR shape (`uid`, `url`, `captions`, `metadata`): fetched like
    `urls`, keeping `uid` (the captions are made anew by our engine)."""

    name = "blip3-ocr"


#: Every input kind, by `--input-format` name: the one place a kind is picked.
READERS: dict[str, InputReader] = {r.name: r for r in (FolderReader(), WebDatasetReader(), Img2DatasetReader(),
                                                        UrlListReader(), Blip3OcrReader())}
INPUT_FORMATS = tuple(READERS)


def reader_for(input_path: str | Path | Location, input_format: str | None = None,
               storage_options: dict[str, Any] | None = None) -> InputReader:
    """The reader of `--input-format`, or of the kind detected from the input."""
    kind = input_format or detect_format(input_path, storage_options)
    if kind not in READERS:
        raise UserError(f"unknown input format {kind!r}; one of {', '.join(INPUT_FORMATS)}", field="--input-format")
    return READERS[kind]
