"""Catalog benchmark: `catalog add` ingest rows/s, the time to re-register one shard, and
stats-query latency at 1M and 10M sample rows.

Synthetic output folders (sidecar parquet with realistic columns, tiny tars) are made once per
scale; each scale runs in its own process so peak memory is that scale's alone. Registration is
`catalog add` itself: batches of shards, one `INSERT ... SELECT` over their parquet files each.
Re-registering replaces one 1000-row shard's rows in the full catalog (the `samples_by_shard`
index keeps it the same at any size: the goal is equal times at 1M and 10M). Temporary files go
to $TMPDIR (10M rows: about 1 GB of parquet and 1 GB of catalog).

    python benchmarks/bench_catalog.py [--scales 1000000 10000000] [--shard-rows 10000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUERIES = {
    "stats ms": "SELECT * FROM v_source_summary ORDER BY source",
    "failures ms": "SELECT * FROM v_failures",
    "caption p50/p90 ms": "SELECT source, quantile_cont(caption_length, [0.5, 0.9]) FROM samples GROUP BY source",
}


def make_output(out: Path, n_rows: int, shard_rows: int, source_idx: int) -> None:
    """Write ceil(n_rows/shard_rows) shards: a one-member tar + sidecar parquet + stats json."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from blip3.core.shards import SIDECAR_SCHEMA, SampleRow, ShardWriter

    rng = np.random.default_rng(source_idx)
    out.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, n_rows, shard_rows)):
        n = min(shard_rows, n_rows - start)
        with ShardWriter(out, index, generator={"name": "bench"}) as w:
            w.add(f"k{index}", {"txt": "x"}, SampleRow(f"k{index}"))
            info = w.close()
        failed = rng.random(n) < 0.03
        cols = {
            "key": [f"s{source_idx}_{start + i:09d}" for i in range(n)],
            "uid": None, "url": None, "caption": None, "sha256": None,
            "status": np.where(failed, "failed", "success"),
            "error_message": np.where(failed, "decode: cannot identify image file", None),
            "width": rng.integers(64, 2048, n, dtype=np.int32), "height": rng.integers(64, 2048, n, dtype=np.int32),
            "original_width": rng.integers(64, 4096, n, dtype=np.int32),
            "original_height": rng.integers(64, 4096, n, dtype=np.int32),
            "image_bytes": rng.integers(5_000, 500_000, n), "caption_length": rng.integers(20, 600, n, dtype=np.int32),
            "n_captions": np.full(n, 12, dtype=np.int32), "n_ocr": rng.poisson(2, n).astype(np.int32),
            "n_objects": rng.poisson(3, n).astype(np.int32), "mean_confidence": rng.random(n, dtype=np.float32),
            "has_source_caption": rng.random(n) < 0.8,
        }
        arrays = [pa.nulls(n, f.type) if cols[f.name] is None else pa.array(cols[f.name], type=f.type) for f in SIDECAR_SCHEMA]
        pq.write_table(pa.Table.from_arrays(arrays, schema=SIDECAR_SCHEMA), info.parquet, compression="zstd")
        stats = json.loads(Path(info.stats).read_text())
        stats.update(count=n, successes=int((~failed).sum()), failed=int(failed.sum()))
        Path(info.stats).write_text(json.dumps(stats))


def reregister_ms(cat, out: Path, source: str, repeats: int = 15) -> tuple[float, float]:
    """(median wall, least CPU) milliseconds to re-register the one shard of `out` (delete its
    rows, read its sidecar again) in `cat`, as `catalog add --refresh` does for a changed tar. The
    least CPU time (all of DuckDB's threads) of the repeats is the figure to compare across sizes
    on a loaded machine: the run least disturbed by the neighbours."""
    from blip3.core.catalog import transaction
    from blip3.core.storage import Location

    folder = Location(out)
    shard = folder.finished()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        with transaction(cat.con):
            cat._replace_shards(folder, shard, source)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return sorted(wall)[repeats // 2] * 1000, min(cpu) * 1000


def run_scale(n_rows: int, shard_rows: int, n_sources: int = 4) -> dict:
    from benchmarks._common import peak_rss_mb
    from blip3.core.catalog import Catalog
    from blip3.core.sql import run_query

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        per_source = n_rows // n_sources
        outs = []
        for s in range(n_sources):
            outs.append(tmp_path / f"src{s}")
            make_output(outs[-1], per_source, shard_rows, s)
        db = tmp_path / "catalog.duckdb"
        t0, c0 = time.perf_counter(), time.process_time()
        with Catalog(db) as cat:
            total = sum(cat.add_output(o).rows for o in outs)
        add_s, add_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        one = tmp_path / "one"
        make_output(one, 1000, 1000, n_sources)
        with Catalog(db) as cat:
            cat.add_output(one)
            rereg_ms, rereg_cpu_ms = reregister_ms(cat, one, "one")
        lat = {}
        for name, q in QUERIES.items():
            run_query(q, db)  # warm the file cache once
            t0 = time.perf_counter()
            for _ in range(3):
                run_query(q, db)
            lat[name] = (time.perf_counter() - t0) / 3 * 1000
        return {"rows": total, "add_s": add_s, "rows_per_s": total / add_s, "rows_per_cpu_s": total / add_cpu_s, "reregister_ms": rereg_ms, "reregister_cpu_ms": rereg_cpu_ms,
                "latency_ms": lat, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--shard-rows", type=int, default=10_000)  # a datagen shard's size
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_scale(args.one, args.shard_rows)))
        return
    from benchmarks._common import report

    rows = []
    for n in args.scales:
        r = subprocess.run([sys.executable, __file__, "--one", str(n), "--shard-rows", str(args.shard_rows)],
                           capture_output=True, text=True, check=True)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        row = {"sample rows": res["rows"], "add s": res["add_s"], "add rows/s": res["rows_per_s"],
               "add rows/CPU-s": res["rows_per_cpu_s"],
               "re-register 1000-row shard ms": res["reregister_ms"],
               "re-register least CPU ms": res["reregister_cpu_ms"]}
        row.update({k: v for k, v in res["latency_ms"].items()})
        row["peak RSS MB"] = res["peak_rss_mb"]
        rows.append(row)
    report("catalog", rows, "catalog: ingest and query latency")


if __name__ == "__main__":
    main()
