"""Import OBELICS / MINT-1T-shaped parquet into interleaved shards (docs/formats.md).

Input: one row per document with parallel list columns `texts` (str | null) and `images`; an
image is given as a file path (absolute, or relative to `image_root`, default the parquet's
folder), as embedded bytes, or as a struct `{bytes, path}` (the Hugging Face `Image` shape).
Output: `<key>.json` = `{"texts", "images", "uid"}` with image members `<key>.img<N>.<ext>`,
written by `core.shards.ShardWriter` (sidecars included).

A document that cannot be imported whole is recorded as failed with its reason and skipped,
never half-written: `format` (lists of unequal length, a position with both or neither set),
`image_url` (URLs are not fetched here: fetch them with img2dataset first), `image_missing`,
`decode` (bytes that are not an image), `duplicate key` (an id already in the same shard).
Rows are read in batches, so memory stays bounded.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from blip3.core.errors import UserError
from blip3.core.keys import sanitize_key
from blip3.core.shards import SampleRow, ShardWriter

_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


@dataclass
class ImportResult:
    documents: int = 0
    failed: int = 0
    shards: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class _Skip(Exception):
    """A document that cannot be imported; the message is the sidecar's `reason: detail`."""


def _image_bytes(value, root: Path) -> bytes:
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise _Skip(f"format: image entry of type {type(value).__name__}")
    if value.startswith(("http://", "https://")):
        raise _Skip(f"image_url: {value[:120]} not fetched (fetch with img2dataset first)")
    p = Path(value) if Path(value).is_absolute() else root / value
    if not p.is_file():
        raise _Skip(f"image_missing: {value}")
    return p.read_bytes()


def _ext(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise _Skip(f"decode: {' '.join(str(e).split())[:120]}") from None
    return _EXT.get(fmt or "", "img")


def _document(texts, images, root: Path) -> tuple[dict, dict[str, bytes]]:
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise _Skip("format: texts and images must be lists of equal length")
    members: dict[str, bytes] = {}
    names: list[str | None] = []
    for pos, (t, im) in enumerate(zip(texts, images)):
        if (t is None) == (im is None):
            raise _Skip(f"format: position {pos} must have exactly one of text and image")
        if im is None:
            names.append(None)
            continue
        data = _image_bytes(im, root)
        name = f"img{len(members)}.{_ext(data)}"
        members[name] = data
        names.append(name)
    return {"texts": texts, "images": names}, members


def import_obelics(parquet: str | Path, output: str | Path, *, shard_size: int = 1000,
                   image_root: str | Path | None = None, batch_rows: int = 256) -> ImportResult:
    """Convert the parquet's documents into interleaved shards under `output`."""
    parquet = Path(parquet)
    try:
        pf = pq.ParquetFile(parquet)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read parquet: {' '.join(str(e).split())}", file=parquet) from None
    cols = set(pf.schema_arrow.names)
    if not {"texts", "images"} <= cols:
        raise UserError(f"needs columns texts and images (has {', '.join(sorted(cols))})", field="texts", file=parquet)
    id_col = next((c for c in ("uid", "id", "document_id") if c in cols), None)
    root = Path(image_root) if image_root else parquet.resolve().parent
    result = ImportResult()
    reasons: Counter[str] = Counter()
    writer: ShardWriter | None = None
    in_shard = row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[c for c in ("texts", "images", id_col) if c]):
            for rec in batch.to_pylist():
                if writer is None:
                    writer = ShardWriter(output, result.shards, generator={"name": "import-obelics", "input": parquet.name})
                uid = str(rec[id_col]) if id_col and rec.get(id_col) is not None else f"{parquet.stem}-{row}"
                key = sanitize_key(uid)
                try:
                    record, members = _document(rec["texts"], rec["images"], root)
                    record["uid"] = uid
                    if writer.add(key, {**members, "json": record},
                                  SampleRow(key, uid=uid, image_bytes=sum(len(b) for b in members.values()),
                                            caption_length=sum(len(t) for t in rec["texts"] if t))):
                        result.documents += 1
                    else:  # the writer recorded it as failed: `duplicate key: ...`
                        reasons["duplicate key"] += 1
                        result.failed += 1
                except _Skip as e:
                    writer.add_failure(SampleRow(key, uid=uid, error_message=str(e)))
                    reasons[str(e).split(":", 1)[0]] += 1
                    result.failed += 1
                row += 1
                in_shard += 1
                if in_shard >= shard_size:
                    writer.close()
                    writer, in_shard = None, 0
                    result.shards += 1
        if writer is not None:
            writer.close()
            writer = None
            result.shards += 1
    finally:
        if writer is not None:
            writer.abort()
    result.reasons = dict(reasons)
    return result
