"""Export OCR shards to the published BLIP3-OCR parquet shape, and read that shape back.

Columns of Salesforce/blip3-ocr-200m: `uid`, `url`, `captions` (JSON string: the 12 variants
`{"text", "granularity", "include_datacomp_raw_cap"}`) and `metadata` (JSON string:
`{"entries": [...]}`). Our `<key>.json` holds exactly those fields, so the export is a projection;
`uid` falls back to the sample key when the input had none. Importing such a parquet as a job
input is the `blip3-ocr` input kind (`datagen.inputs`): its URLs are fetched by the shard tasks,
keeping `uid`, and OCR'd anew.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from blip3.core.errors import UserError
from blip3.core.shards import Shard, iter_tar_index, read_span
from blip3.core.storage import Location, output_location

BLIP3_OCR_SCHEMA = pa.schema([("uid", pa.string()), ("url", pa.string()),
                              ("captions", pa.string()), ("metadata", pa.string())])


def export_blip3_ocr(output: str | Path, parquet_dir: str | Path, *, rows_per_file: int = 100_000) -> tuple[list[str], int]:
    """Write `part-NNNNN.parquet` files from the shards of `output`; returns (file locations, rows).
    Either folder may be local or on any fsspec filesystem.

    The parts are written into a local staging folder and published only once all are written
    (each part atomically); then the previous export's parts that this one did not rewrite are
    removed, so a smaller re-export leaves no stale `part-*.parquet` behind (they would be read as
    duplicate rows), and a failed export leaves the previous one whole.
    """
    shards = Location(output).finished()
    if not shards:
        raise UserError("no finished shards (NNNNNN_stats.json) found", file=output)
    dest = output_location(parquet_dir, field="--out")
    dest.mkdir()
    with tempfile.TemporaryDirectory(prefix="blip3-export-") as staging:
        names, total = _write_parts(shards, Path(staging), rows_per_file)
        for name in names:
            dest.put(Path(staging) / name, name)
    for old in dest.names():
        if old.startswith("part-") and old.endswith(".parquet") and old not in names:
            dest.remove(old)
    return [dest.where(name) for name in names], total


def _write_parts(shards: list[Shard], dest: Path, rows_per_file: int) -> tuple[list[str], int]:
    names: list[str] = []
    rows: list[dict[str, str | None]] = []
    total = 0

    def flush() -> None:
        nonlocal rows
        if rows:
            name = f"part-{len(names):05d}.parquet"
            pq.write_table(pa.Table.from_pylist(rows, schema=BLIP3_OCR_SCHEMA), dest / name, compression="zstd")
            names.append(name)
            rows = []

    from blip3.core.logs import progress

    with progress(transient=True) as bar:
        task = bar.add_task(f"export {len(shards)} shard(s)", total=len(shards))
        for info in shards:
            for key, raw in _iter_json_members(info.tar):
                record = json.loads(raw)
                if "captions" not in record or "entries" not in record.get("metadata", {}):
                    raise UserError("not an OCR shard (sample json lacks captions/metadata.entries)", file=info.tar)
                rows.append({
                    "uid": record.get("uid") or key,
                    "url": record.get("url"),
                    "captions": json.dumps(record["captions"], ensure_ascii=False),
                    "metadata": json.dumps(record["metadata"], ensure_ascii=False),
                })
                total += 1
                if len(rows) >= rows_per_file:
                    flush()
            bar.advance(task)
    flush()
    return names, total


def _iter_json_members(tar: str) -> Iterator[tuple[str, bytes]]:
    """(key, json bytes) of each sample that has a json member; the images are seeked over, not read."""
    where = Location(tar)
    with where.open() as headers, where.open() as f:  # one handle scans headers, the other reads data
        for sample in iter_tar_index(tar, fileobj=headers):
            for member in sample.members:
                if member.ext == "json":
                    yield sample.key, read_span(f, member.offset, member.size)
                    break
