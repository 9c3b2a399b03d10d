"""Export OCR shards to the published BLIP3-OCR parquet shape, and read that shape back.

Columns of Salesforce/blip3-ocr-200m: `uid`, `url`, `captions` (JSON string: the 12 variants
`{"text", "granularity", "include_datacomp_raw_cap"}`) and `metadata` (JSON string:
`{"entries": [...]}`). Our `<key>.json` holds exactly those fields, so the export is a projection;
`uid` falls back to the sample key when the input had none. Importing such a parquet as a job
input is the `blip3-ocr` input kind (`datagen.inputs`): its URLs are fetched through img2dataset,
keeping `uid`, and OCR'd anew.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import UserError
from core.shards import iter_shard, list_shards

BLIP3_OCR_SCHEMA = pa.schema([("uid", pa.string()), ("url", pa.string()),
                              ("captions", pa.string()), ("metadata", pa.string())])


def export_blip3_ocr(output: str | Path, parquet_dir: str | Path, *, rows_per_file: int = 100_000) -> tuple[list[Path], int]:
    """Write `part-NNNNN.parquet` files from the shards of `output`; returns (files, rows)."""
    shards = list_shards(output)
    if not shards:
        raise UserError("no finished shards (NNNNNN_stats.json) found", file=output)
    dest = Path(parquet_dir)
    dest.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    rows: list[dict[str, str | None]] = []
    total = 0

    def flush() -> None:
        nonlocal rows
        if rows:
            path = dest / f"part-{len(files):05d}.parquet"
            pq.write_table(pa.Table.from_pylist(rows, schema=BLIP3_OCR_SCHEMA), path, compression="zstd")
            files.append(path)
            rows = []

    for info in shards:
        for sample in iter_shard(info.tar):
            if "json" not in sample:
                continue
            record = json.loads(sample["json"])
            if "captions" not in record or "entries" not in record.get("metadata", {}):
                raise UserError("not an OCR shard (sample json lacks captions/metadata.entries)", file=info.tar)
            rows.append({
                "uid": record.get("uid") or sample["__key__"],
                "url": record.get("url"),
                "captions": json.dumps(record["captions"], ensure_ascii=False),
                "metadata": json.dumps(record["metadata"], ensure_ascii=False),
            })
            total += 1
            if len(rows) >= rows_per_file:
                flush()
    flush()
    return files, total
