"""Random access to the samples of a WebDataset tar, and decoding them into loader sample dicts.

The loader reads a contiguous run of samples from the middle of a shard (its share of an epoch,
or the block it resumes in). A tar is a sequence of headers and data, so an index of where each
member's data starts (built by reading headers only, seeking over data) lets it read exactly the
members it needs. Samples are grouped the webdataset way: consecutive members with the same key
(`core.shards.iter_tar_index`).

Indexing is most of a loader worker's CPU time when it goes through `tarfile` (about 60 us a
header), and with several workers each one indexes every shard it touches while reading only its
share of it. So the common case, a plain ustar/GNU tar of regular files (what `ShardWriter`
writes), is indexed here from the raw 512-byte headers; anything else in a tar (long names, pax
headers, links, a bad checksum, a truncated member) hands the whole file to
`core.shards.iter_tar_index`, so such tars read exactly as before, errors included.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections import OrderedDict
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import Any

from blip3.core.errors import UserError
from blip3.core.shards import MemberSpan, SampleIndex, is_image_ext, iter_tar_index, split_member_name

_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # what tarfile counts as a regular file, less GNU sparse files
_MAGICS = (b"ustar\x0000", b"ustar  \x00")  # POSIX ustar, GNU
_OCTAL = re.compile(rb"[0-7]*")


class _NotPlain(Exception):
    """The tar holds something only `tarfile` reads right."""


def _octal(field: bytes) -> int:
    """A numeric header field of octal digits only; `_NotPlain` for anything `int` would also take
    (a sign, underscores): a negative size would step the scan backwards, forever."""
    digits = field.split(b"\0", 1)[0].strip()
    if not _OCTAL.fullmatch(digits):
        raise _NotPlain
    return int(digits or b"0", 8)


def _plain_members(f, size: int) -> list[tuple[str, str, int, int, int]]:
    """(key, ext, data offset, data size, header offset) of each member, from the raw headers, as `tarfile`
    reads them; `_NotPlain` at the first header that is not a plain regular file."""
    out, off = [], 0
    while True:
        if off == size:
            return out
        f.seek(off)
        buf = f.read(_BLOCK)
        if len(buf) < _BLOCK:
            raise _NotPlain
        if buf.count(0) == _BLOCK:  # end-of-archive block
            return out
        if buf[156:157] not in _REGULAR or buf[257:265] not in _MAGICS or buf[124] & 0x80:
            raise _NotPlain
        checksum, length = _octal(buf[148:156]), _octal(buf[124:136])
        if checksum != 256 + sum(buf[:148]) + sum(buf[156:]):
            raise _NotPlain
        name = buf[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        prefix = buf[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if prefix:
            name = f"{prefix}/{name}"
        if name.endswith("/"):  # an old-style directory entry
            raise _NotPlain
        header, data = off, off + _BLOCK
        off = data + -(-length // _BLOCK) * _BLOCK
        if off > size:  # the member's data runs past the end of the file
            raise _NotPlain
        out.append((*split_member_name(name), data, length, header))


def _index(path: str | Path) -> list[SampleIndex]:
    with open(path, "rb") as f:
        try:
            members = _plain_members(f, os.fstat(f.fileno()).st_size)
        except _NotPlain:
            return list(iter_tar_index(path))
    samples = []
    for key, group in groupby(members, key=itemgetter(0)):
        group = list(group)
        samples.append(SampleIndex(key, tuple(MemberSpan(ext, o, n) for _, ext, o, n, _ in group), header=group[0][4]))
    return samples


def index_tar(path: str | Path) -> list[SampleIndex]:
    """Samples of a tar in order, by reading headers only (the same as `core.shards.iter_tar_index`)."""
    try:
        return _index(path)
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"cannot read tar: {' '.join(str(e).split())}", file=path) from None


def decode_sample(raw: dict[str, bytes], *, key: str, source: str, kind: str, shard: str) -> dict[str, Any]:
    """Raw members -> the loader's sample dict (docs/formats.md, "Loader samples"): json parsed, txt decoded, images kept
    as bytes under their member name (`jpg` for caption shards, `img0.jpg` for documents)."""
    meta: dict[str, Any] = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"sample {key}: {key}.json is not valid JSON ({e})", file=shard) from None
    txt = raw["txt"].decode("utf-8", errors="replace") if "txt" in raw else None
    images = {ext: data for ext, data in raw.items() if is_image_ext(ext)}
    return {"source": source, "kind": kind, "key": key, "json": meta, "txt": txt, "images": images}


class TarCache:
    """A few open tars and their indexes (LRU), so a run of reads does not re-index a shard.

    `size=None`: no limit; the owner says which tars to keep with `retain`."""

    def __init__(self, size: int | None = 8):
        self.size = size
        self._items: OrderedDict[str, tuple[Any, list[SampleIndex]]] = OrderedDict()

    def get(self, path: str, expected_samples: int | None = None,
            exclude: list[str] | None = None) -> tuple[Any, list[SampleIndex]]:
        """The open tar and its index, less the samples whose keys are in `exclude` (what curation
        left out: the loader's positions count kept samples only). The cache holds one exclusion
        list per path (a manifest lists a shard once)."""
        if path in self._items:
            self._items.move_to_end(path)
            return self._items[path]
        index = index_tar(path)
        if exclude:
            left_out = set(exclude)
            kept = [e for e in index if e.key not in left_out]
            if len(index) - len(kept) != len(left_out):
                raise UserError(f"the manifest leaves out {len(left_out) - len(index) + len(kept)} key(s) the shard "
                                "does not hold (it changed)", file=path)
            index = kept
        if expected_samples is not None and len(index) != expected_samples:
            raise UserError(
                f"shard holds {len(index)} samples but the manifest records {expected_samples} (it changed)", file=path
            )
        f = open(path, "rb")
        self._items[path] = (f, index)
        while self.size is not None and len(self._items) > self.size:
            _, (old, _) = self._items.popitem(last=False)
            old.close()
        return self._items[path]

    def retain(self, paths: set[str]) -> None:
        """Close every tar not in `paths` (those stay open, their indexes kept)."""
        for path in [p for p in self._items if p not in paths]:
            self._items.pop(path)[0].close()

    def close(self) -> None:
        for f, _ in self._items.values():
            f.close()
        self._items.clear()
