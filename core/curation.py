"""Curation results in the catalog: fingerprints, scores, decisions and benchmark matches per sample.

The tables (created with the others in `core.catalog.SCHEMA`) are keyed like `samples`, by
(`shard`, `key`), with the `source` beside them:

- `sample_hashes`     sha256 of the image bytes, sha256 of the decoded pixels, 64-bit pHash, size
- `sample_scores`     one row per (sample, score name): `clip`, `blur`, `aspect`, `caption_words`, ...
- `sample_decisions`  one row per (sample, rule) the rule looked at: kept or not, and why
- `benchmark_matches` training samples whose image is also a `blip3 eval` benchmark image

Nothing here deletes a sample from a shard: a decision only changes what `blip3 mix build` draws.

Registering a re-run replaces its rows shard by shard: one `DELETE ... WHERE shard = ?` per shard
(answered through the table's `shard` index, as shard re-registration in `core.catalog` is), then
one bulk insert of the new rows from Arrow. The cost is per shard, whatever the table size.
"""

from __future__ import annotations

from collections.abc import Iterable

import duckdb
import pyarrow as pa

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
    """
    if table not in TABLES:
        raise ValueError(f"not a curation table: {table}")
    column = TABLES[table]
    names = sorted(set(what)) if what is not None else None
    if column is not None and names is None:
        raise ValueError(f"{table}: say which {column}s the rows replace")
    cols = ", ".join(rows.column_names)
    with transaction(con):
        delete = f"DELETE FROM {table} WHERE shard = ?"
        params: list[list] = [[s] for s in sorted(set(shards))]
        if column is not None:
            delete += f" AND list_contains(?::VARCHAR[], {column})"
            params = [[s, names] for s, in params]
        if params:
            con.executemany(delete, params)
        if rows.num_rows:
            con.register("_curation_rows", rows)
            try:
                con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _curation_rows")
            finally:
                con.unregister("_curation_rows")
    return rows.num_rows
