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
import os
import tarfile
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from blip3.core.errors import UserError, describe_exception
from blip3.core.keys import sanitize_key
from blip3.core.storage import Location, stamp_of, url_scheme
from blip3.core.shards import IMAGE_EXTS, MemberSpan, is_image_ext, iter_tar_index, read_span, split_member_name

INPUT_FORMATS = ("folder", "webdataset", "img2dataset", "urls", "blip3-ocr")
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

    `locator` is `["file", path]`, `["tar", path, offset, size]`, `["url", url]` (fetched by
    `load_sample`), `["store", Location, name]` / `["store", Location, name, offset, size]` (an
    object, or a tar member, on an object store) or `["none"]` (pre-failed).
    Refs of local inputs serialise to JSON (`to_json`/`from_json`); a store's refs share their one
    `Location`, which pickles without its connection.
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
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "SampleRef":
        return cls(**json.loads(text))


# -- detection ---------------------------------------------------------------------------------
def detect_format(input_path: str | Path) -> str:
    """Guess the input kind from the path; raises UserError when it cannot tell."""
    text = str(input_path)
    if "{" in text and "}" in text:
        return "webdataset"
    path = Path(text)
    if not path.exists():
        raise UserError("input does not exist", file=path)
    if path.is_dir():
        if any(path.glob("*.tar")):
            _refuse_mixed_folder(path)
            return "img2dataset" if _is_img2dataset_dir(path) else "webdataset"
        return "folder"
    suffix = path.suffix.lower()
    if suffix == ".tar":
        return "webdataset"
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        names = set(pq.read_schema(path).names)
        if {"captions", "metadata", "url"} <= names:
            return "blip3-ocr"
        if "url" in names:
            return "urls"
        raise UserError("parquet has no `url` column; cannot use it as an input", field="url", file=path)
    if suffix in URL_LIST_SUFFIXES:
        return "urls"
    raise UserError(
        f"cannot tell the input kind; pass --input-format ({', '.join(INPUT_FORMATS)})", file=path
    )


def _refuse_mixed_folder(path: Path) -> None:
    """A folder holding both tars and loose images is ambiguous: taking it as tars would silently
    drop the images (and a job writing its shards into its own input folder looks just like it),
    so the user must say which one they mean."""
    loose = next((p for p in path.rglob("*") if _ext_of(p.name) in IMAGE_EXTS and (p.is_file() or p.is_symlink())), None)
    if loose is not None:
        raise UserError(
            f"holds both .tar files and loose images (e.g. {loose.relative_to(path).as_posix()}); pass "
            "--input-format folder (the loose images) or --input-format webdataset (the tars)",
            file=path,
        )


def check_output_outside_input(input_path: str | Path, output_dir: str | Path) -> None:
    """Refuse an output folder that is, or lies inside, a folder input: the job's own shards would
    become input on the next run (or be mistaken for it), so inputs could be dropped or doubled."""
    text = str(input_path)
    if "{" in text:
        return
    if url_scheme(text) not in (None, "file"):  # a folder on an object store: compare the URLs
        src_url, out_url = text.rstrip("/"), str(output_dir).rstrip("/")
        if out_url == src_url or out_url.startswith(src_url + "/"):
            raise UserError(f"output {out_url} is inside the input folder; choose an output outside it",
                            file=text, field="--output")
        return
    if url_scheme(str(output_dir)) not in (None, "file"):  # a local input, an object-store output
        return
    src = Path(text).resolve()
    if not src.is_dir():
        return
    out = Path(output_dir).resolve()
    if out == src or src in out.parents:
        raise UserError(f"output folder {out} is inside the input folder; choose an output outside it",
                        file=src, field="--output")


def _is_img2dataset_dir(path: Path) -> bool:
    """img2dataset writes `NNNNN.parquet` with an `error_message` column beside each tar. Our own
    outputs carry its columns too, plus ours (`n_captions`): they are read as WebDataset tars, whose
    `.json` tells our caption (`.txt`) from the source caption."""
    import pyarrow.parquet as pq

    for parquet in sorted(path.glob("*.parquet")):
        try:
            names = pq.read_schema(parquet).names
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


def iter_refs(input_path: str | Path, input_format: str | None = None) -> Iterator[SampleRef]:
    """Yield the input's samples as refs, in a stable order, with sanitised unique keys.

    Keys are unique over the whole input; the datagen pipeline, which must not hold every key of
    a large job, uses `iter_raw_refs` and makes keys unique per shard instead (datagen.plans).
    """
    dedup = _KeyDeduper()
    for ref in iter_raw_refs(input_path, input_format):
        ref.key = dedup(ref.key)
        yield ref


def iter_raw_refs(input_path: str | Path, input_format: str | None = None) -> Iterator[SampleRef]:
    """`iter_refs` before key de-duplication: raw keys, not yet sanitised, in the same stable order."""
    kind = input_format or detect_format(input_path)
    if kind not in INPUT_FORMATS:
        raise UserError(f"unknown input format {kind!r}; one of {', '.join(INPUT_FORMATS)}", field="--input-format")
    if kind == "folder":
        raw = _folder_refs(Path(input_path))
    elif kind == "webdataset":
        raw = _webdataset_refs(str(input_path))
    elif kind == "img2dataset":
        raw = _img2dataset_refs(Path(input_path))
    else:
        raw = _url_list_refs(Path(input_path))
    yield from raw


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
    elif kind == "file":
        image = Path(ref.locator[1]).read_bytes()
    elif kind == "tar":
        _, path, offset, size = ref.locator
        with open(path, "rb") as f:
            image = read_span(f, int(offset), int(size))
    elif kind == "store":
        store, name, *span = ref.locator[1:]
        start, end = (int(span[0]), int(span[0]) + int(span[1])) if span else (None, None)
        image = store.fs.cat_file(store.path(name), start=start, end=end)
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


def _folder_refs(root: Path) -> Iterator[SampleRef]:
    if not root.is_dir():
        raise UserError("not a directory", file=root)
    files = sorted(
        (p for p in root.rglob("*") if _ext_of(p.name) in IMAGE_EXTS and (p.is_file() or _is_dangling(p))),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    for path in files:
        rel = path.relative_to(root).as_posix()
        if _is_dangling(path):
            yield SampleRef(key=rel.rsplit(".", 1)[0], ext=_ext_of(path.name), locator=["none"], meta={"path": rel},
                            error=f"dangling_symlink: {rel} points at {os.readlink(path)}, which does not exist")
            continue
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8", errors="replace").strip() if caption_file.is_file() else None
        st = path.stat()
        yield SampleRef(
            key=rel.rsplit(".", 1)[0], ext=_ext_of(path.name), locator=["file", str(path.resolve())],
            source_caption=caption or None, meta={"path": rel}, stamp=f"{st.st_size}:{st.st_mtime_ns}",
        )


def _is_dangling(path: Path) -> bool:
    """A symlink whose target is gone: an input the user listed, so it gets a failed row."""
    return path.is_symlink() and not path.exists()


def expand_tar_pattern(pattern: str) -> list[Path]:
    """Brace pattern, single tar, or folder of tars -> the tar paths (pattern order / sorted)."""
    if "{" in pattern:
        from braceexpand import braceexpand

        paths = [Path(p) for p in braceexpand(pattern)]
    else:
        p = Path(pattern)
        paths = sorted(p.glob("*.tar")) if p.is_dir() else [p]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{len(missing)} shard(s) not found, first: {missing[0]}", file=pattern)
    if not paths:
        raise UserError("no .tar shards found", file=pattern)
    return paths


@dataclass(frozen=True)
class TarSource:
    """One input tar: a local path, or the name of an object under `store` (any fsspec filesystem).
    Picklable, so a Ray task on any node reads the tar itself."""

    path: str
    store: Location | None = None
    #: an img2dataset part's `NNNNN.parquet` (local): its rows, sorted by key, are the refs
    parquet: str | None = None

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.path if self.store is None else f"{self.store.url}/{self.path}"

    def open(self) -> BinaryIO:
        if self.store is None:
            return open(self.path, "rb")
        return self.store.fs.open(self.store.path(self.path), "rb")

    def size(self) -> int:
        if self.parquet is not None:  # the tar may be missing (every row failed); both files count
            return os.path.getsize(self.parquet) + (os.path.getsize(self.path) if os.path.isfile(self.path) else 0)
        if self.store is None:
            return os.path.getsize(self.path)
        size = self.store.size(self.path)
        if size is None:
            raise FileNotFoundError(f"no such object: {self}")
        return size

    def scan(self, start: int = 0, headers: Any = None) -> Iterator[_TarSample]:
        """`scan_tar` of this tar, from the sample whose header is at byte `start`."""
        if self.store is None:
            yield from scan_tar(Path(self.path), start=start, headers=headers)
            return
        with self.open() as f:
            yield from scan_tar(str(self), fileobj=f, start=start, headers=headers)

    def locator(self, offset: int, size: int) -> list[Any]:
        if self.store is None:
            return ["tar", str(Path(self.path).resolve()), offset, size]
        return ["store", self.store, self.path, offset, size]


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


def _webdataset_refs(pattern: str) -> Iterator[SampleRef]:
    for path in expand_tar_pattern(pattern):
        src = TarSource(str(path))
        with src.open() as f:
            for sample in src.scan():
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

            count.refs = pq.read_metadata(src.parquet).num_rows
            count.stamp = "|".join(str(Location(p).stamp()) for p in (src.parquet, src.path))
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
    """Refs `start .. stop-1` of one tar, numbered as `_webdataset_refs` yields them, with raw keys;
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
        for ref in islice(_img2dataset_part_refs(Path(src.parquet)), start, stop):
            ordinal += 1
            yield ref
    else:
        ordinal = seek[0]
        with src.open() as f:
            for sample in src.scan(seek[1]):
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


def store_tars(url: str, storage_options: dict[str, Any] | None) -> list[TarSource]:
    """The tars of an object-store input: a brace pattern, one `.tar`, or a folder of tars (sorted),
    as `expand_tar_pattern` reads local ones. Existence is checked by the tasks that count them."""
    url = url.rstrip("/")
    if "{" in url:
        from braceexpand import braceexpand

        root = url[: url.index("{")].rpartition("/")[0]
        names = [u[len(root) + 1:] for u in braceexpand(url)]
    elif url.lower().endswith(".tar"):
        root, _, name = url.rpartition("/")
        names = [name]
    else:
        root = url
        names = sorted(n for n in Location(root, storage_options).names() if n.endswith(".tar"))
        if not names:
            raise UserError("no .tar shards found", file=url)
    store = Location(root, storage_options)
    return [TarSource(name, store) for name in names]


def detect_store_format(url: str, storage_options: dict[str, Any] | None) -> str:
    """`detect_format` for an object-store location (URL lists are staged and detected locally)."""
    text = url.rstrip("/")
    if "{" in text or text.lower().endswith(".tar"):
        return "webdataset"
    names = Location(text, storage_options).names()
    if not names:
        raise UserError("input does not exist (or is an empty folder)", file=url)
    if any(n.endswith(".tar") for n in names):
        if any(n.endswith(".parquet") and n[:-8].isdigit() for n in names):
            raise UserError("a folder of tars with NNNNN.parquet beside them on an object store: pass "
                            "--input-format webdataset to read its tars (img2dataset's parquet is read "
                            "only from a local or mounted folder)", file=url)
        return "webdataset"
    return "folder"


def store_folder_refs(store: Location) -> Iterator[SampleRef]:
    """`_folder_refs` of a folder on an object store: every image under it, sorted by relative
    path, a `name.txt` beside `name.jpg` as its source caption; the bytes are read by the shard task."""
    found = store.find()
    for rel in sorted(found):
        if _ext_of(rel) not in IMAGE_EXTS:
            continue
        stem = rel.rsplit(".", 1)[0]
        text = store.read_bytes(f"{stem}.txt") if f"{stem}.txt" in found else None
        caption = text.decode("utf-8", errors="replace").strip() if text else None
        yield SampleRef(key=stem, ext=_ext_of(rel), locator=["store", store, rel], source_caption=caption or None,
                        meta={"path": rel}, stamp=stamp_of(found[rel]))


def _img2dataset_refs(folder: Path) -> Iterator[SampleRef]:
    """Every URL img2dataset tried, by key (= input order); its failures become failed refs."""
    parquets = sorted(p for p in folder.glob("*.parquet") if p.stem.isdigit())
    if not parquets:
        raise UserError("no img2dataset parquet files (NNNNN.parquet) found", file=folder)
    for parquet in parquets:
        yield from _img2dataset_part_refs(parquet)


def img2dataset_parts(folder: Path) -> list[TarSource]:
    """An img2dataset folder's parts (`NNNNN.parquet` and its tar), in order, for `count_tar`."""
    parquets = sorted(p for p in folder.glob("*.parquet") if p.stem.isdigit())
    if not parquets:
        raise UserError("no img2dataset parquet files (NNNNN.parquet) found", file=folder)
    return [TarSource(str(p.with_suffix(".tar")), parquet=str(p)) for p in parquets]


def _img2dataset_part_refs(parquet: Path) -> Iterator[SampleRef]:
    tar = parquet.with_suffix(".tar")
    samples = {s.key: s for s in scan_tar(tar) if s.link is None} if tar.is_file() else {}
    with open(tar, "rb") if samples else contextlib.nullcontext() as f:
        yield from _img2dataset_parquet_refs(parquet, TarSource(str(tar)), f, samples)


def _img2dataset_parquet_refs(parquet: Path, tar: TarSource, f: BinaryIO | None,
                              samples: dict[str, _TarSample]) -> Iterator[SampleRef]:
    import pyarrow.parquet as pq

    # img2dataset writes rows in completion order; its keys follow the input order: sort by key.
    for row in sorted(pq.read_table(parquet).to_pylist(), key=lambda r: str(r.get("key"))):
        key = str(row.get("key"))
        extra = {"uid": row.get("uid"), "url": row.get("url"),
                 "caption": row.get("caption")}
        if f is not None and row.get("status") == "success" and key in samples:
            yield _tar_sample_ref(tar, f, samples[key], extra)
        else:
            reason = row.get("error_message") or row.get("status") or "missing from tar"
            yield SampleRef(
                key=key, ext="", locator=["none"], uid=_str_or_none(extra["uid"]), url=_str_or_none(extra["url"]),
                source_caption=extra["caption"], meta={"shard": parquet.name},
                error=f"download: {reason}",
            )


def _url_list_refs(path: Path) -> Iterator[SampleRef]:
    """One ref per row of a URL list, keyed by row number (img2dataset's habit), in file order; the
    bytes are fetched later by `load_sample`. A non-http(s) URL is a failed ref, never opened."""
    from blip3.datagen.fetch import iter_url_rows, scheme_error

    for number, row in enumerate(iter_url_rows(path)):
        refused = scheme_error(row["url"])
        yield SampleRef(key=f"{number:09d}", ext="", locator=["none"] if refused else ["url", row["url"].strip()],
                        uid=row["uid"], url=row["url"], source_caption=row["caption"] or None, error=refused)
