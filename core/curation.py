"""Curation results in the catalog: fingerprints, scores, decisions and benchmark matches per sample.

The tables (created with the others in `core.catalog.SCHEMA`) are keyed like `samples`, by
(`shard`, `key`), with the `source` beside them:

- `sample_hashes`     sha256 of the image bytes, sha256 of the decoded pixels, 64-bit pHash, size
- `sample_scores`     one row per (sample, score name): `clip`, `blur`, `aspect`, `caption_words`, ...
- `sample_decisions`  one row per (sample, rule) the rule looked at: kept or not, and why
- `benchmark_matches` training samples whose image is also a `blip3 eval` benchmark image

Nothing here deletes a sample from a shard: a decision only changes what `blip3 mix build` draws.

Registering a re-run replaces its rows shard by shard, with statements on `shard = ?` only (answered
through the table's `shard` index, as shard re-registration in `core.catalog` is), then one bulk
insert from Arrow: the cost is per shard, whatever the table size.
"""

from __future__ import annotations

from collections.abc import Iterable

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from blip3.core.catalog import transaction

#: The curation tables and the column that names what a row is about (a re-run of some rules or
#: scores replaces only those; None: every row of the shard).
TABLES: dict[str, str | None] = {
    "sample_hashes": None,
    "sample_scores": "name",
    "sample_decisions": "rule",
    "benchmark_matches": None,
}


def replace_rows(con: duckdb.DuckDBPyConnection, table: str, rows: pa.Table, shards: Iterable[str],
                 what: Iterable[str] | None = None) -> int:
    """Replace, in one transaction, the rows of `table` for `shards` (and, for scores and
    decisions, only the names/rules in `what`) by `rows`; returns how many were inserted.

    `shards` are the shards the run looked at: a shard whose new result has no rows (no benchmark
    match any more) loses its old ones too.

    Every statement filters on `shard` alone, the one form DuckDB answers through the index (a
    conjunction `shard = ? AND rule = ?` scans the table): a shard's rows of other rules are read
    (`shard = ?`), the shard's rows deleted (`shard = ?`), and those kept re-inserted with the new
    rows in one bulk insert.
    """
    if table not in TABLES:
        raise ValueError(f"not a curation table: {table}")
    column = TABLES[table]
    names = sorted(set(what)) if what is not None else None
    if column is not None and names is None:
        raise ValueError(f"{table}: say which {column}s the rows replace")
    cols = rows.column_names
    shards = sorted(set(shards))
    with transaction(con):
        kept: list[pa.Table] = []
        if column is not None:
            for shard in shards:
                old = con.sql(f"SELECT {', '.join(cols)} FROM {table} WHERE shard = ?", params=[shard]).to_arrow_table()
                if old.num_rows:
                    kept.append(old.filter(pc.invert(pc.is_in(old[column], value_set=pa.array(names, pa.string())))))
        if shards:
            con.executemany(f"DELETE FROM {table} WHERE shard = ?", [[s] for s in shards])
        schema = con.sql(f"SELECT {', '.join(cols)} FROM {table} LIMIT 0").to_arrow_table().schema
        new = pa.concat_tables([t.cast(schema) for t in kept] + [rows.cast(schema)])
        if new.num_rows:
            con.register("_curation_rows", new)
            try:
                con.execute(f"INSERT INTO {table} ({', '.join(cols)}) SELECT {', '.join(cols)} FROM _curation_rows")
            finally:
                con.unregister("_curation_rows")
    return rows.num_rows
