"""Curation results in the catalog: fingerprints, scores, decisions and benchmark matches per sample.

This module is the catalog layer for the curation tables: `blip3 curate` (datagen/curate.py), the
audit page (datagen/audit_curation.py) and `blip3 mix build` (mixture/curation.py) call its
functions, which return Arrow tables or Python values; none of them holds SQL.

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

A curation run reads its per-sample columns (the parquet the Ray stages wrote) through the temporary
view `samples_run` (`attach_run_samples`); the `run_*` functions read that view.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

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


# --- the shards a run curates -------------------------------------------------------------------

def curatable_shards(con: duckdb.DuckDBPyConnection, sources: list[str]) -> list[tuple[str, str]]:
    """(source, shard path) of every shard registered `ok` of `sources` (empty: of every source),
    ordered by source and path."""
    return con.execute(
        "SELECT source, path FROM shards WHERE status = 'ok' AND (len(?::VARCHAR[]) = 0 OR list_contains(?, source)) "
        "ORDER BY source, path", [sources, sources]).fetchall()


def source_ranks(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Source name -> its rank by registration time (1 first): the duplicate rules keep the
    sample of the source registered first."""
    return dict(con.execute("SELECT name, dense_rank() OVER (ORDER BY added_at, name) FROM sources").fetchall())


# --- one run's per-sample columns (the view `samples_run`) ---------------------------------------

def _sql_string(text: str) -> str:
    return text.replace("'", "''")


def attach_run_samples(con: duckdb.DuckDBPyConnection, samples_dir: Path) -> int:
    """Make the run's parquet under `samples_dir` the temporary view `samples_run`; returns its
    number of samples."""
    path = _sql_string(str(Path(samples_dir).resolve()))
    con.execute(f"CREATE OR REPLACE TEMP VIEW samples_run AS SELECT * FROM read_parquet('{path}/*.parquet')")
    return con.execute("SELECT count(*) FROM samples_run").fetchall()[0][0]


def run_hashes(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """The run's fingerprints and sizes, shaped as `sample_hashes` rows."""
    return con.sql(
        "SELECT source, shard, key, sha256, pixel_sha256, CASE WHEN has_phash THEN phash END::UBIGINT AS phash, "
        '"score.width"::INTEGER AS width, "score.height"::INTEGER AS height, "score.image_bytes"::BIGINT AS image_bytes '
        "FROM samples_run").to_arrow_table()


def run_score_names(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The names of the run's scores (its `score.<name>` columns), in column order."""
    return [r[0].removeprefix("score.") for r in con.execute("DESCRIBE samples_run").fetchall()
            if r[0].startswith("score.")]


def run_scores(con: duckdb.DuckDBPyConnection, generators: dict[str, str]) -> pa.Table:
    """The run's scores unpivoted into `sample_scores` rows (a NaN is no score), each named with
    its generator (`generators`: score name -> what computed it)."""
    parts = [
        f"SELECT source, shard, key, '{_sql_string(name)}' AS name, \"score.{name}\" AS value, "
        f"'{_sql_string(generator)}' AS generator FROM samples_run WHERE NOT isnan(\"score.{name}\")"
        for name, generator in generators.items()]
    return con.sql(" UNION ALL ".join(parts)).to_arrow_table()


@dataclass(frozen=True)
class Threshold:
    """A threshold rule as applied: `rule` drops a sample whose `score` is `drop_when` ("below" or
    "above") `value`."""

    rule: str
    score: str
    drop_when: str
    value: float


def _threshold_sql(t: Threshold) -> str:
    """SELECT producing the rule's decision rows from the `sample_scores`-shaped view `scores`."""
    op = "<" if t.drop_when == "below" else ">"
    return (f"SELECT source, shard, key, '{t.rule}' AS rule, NOT coalesce(value {op} {t.value!r}, false) AS kept, "
            f"CASE WHEN value {op} {t.value!r} THEN '{t.score} ' || round(value, 4) || ' {t.drop_when} "
            f"{t.value!r}' END AS reason, NULL::VARCHAR AS cluster "
            f"FROM scores WHERE name = '{t.score}'")


def _language_sql(rule: str, languages: tuple[str, ...]) -> str:
    """Decision rows of the language rule from the `lang` column of the run's samples."""
    allowed = ", ".join(f"'{code}'" for code in languages if re.fullmatch(r"[a-z]{2,3}", code))
    ok = f"coalesce(lang IN ({allowed}), false)"
    return (f"SELECT source, shard, key, '{rule}' AS rule, {ok} AS kept, "
            f"CASE WHEN NOT {ok} THEN 'language ' || coalesce(nullif(lang, ''), 'none') || ' (p=' || "
            f"coalesce(round(\"score.lang_score\", 3)::VARCHAR, '-') || '), kept: {', '.join(languages)}' END AS reason, "
            "NULL::VARCHAR AS cluster FROM samples_run WHERE lang IS NOT NULL")


def run_rule_decisions(con: duckdb.DuckDBPyConnection, shards: list[str], thresholds: list[Threshold],
                       languages: tuple[str, ...] | None, *, language_rule: str, decodes_rule: str) -> pa.Table:
    """`sample_decisions` rows of the per-sample rules for `shards`: each threshold over every score
    recorded for the shards whose name it reads (a score from an earlier run is judged with today's
    threshold; a threshold on a score never recorded decides nothing), the language rule over the
    run's `lang` (None: not applied), and `decodes_rule` (the image member decodes, else why not)."""
    con.execute("CREATE OR REPLACE TEMP TABLE run_shards AS SELECT unnest(?::VARCHAR[]) AS shard", [shards])
    con.execute("CREATE OR REPLACE TEMP VIEW scores AS SELECT * FROM sample_scores SEMI JOIN run_shards USING (shard)")
    scored = {r[0] for r in con.execute("SELECT DISTINCT name FROM scores").fetchall()}
    parts = [_threshold_sql(t) for t in thresholds if t.score in scored]
    if languages is not None:
        parts.append(_language_sql(language_rule, languages))
    parts.append(f"SELECT source, shard, key, '{decodes_rule}' AS rule, image_error = '' AS kept, "
                 "nullif(image_error, '') AS reason, NULL::VARCHAR AS cluster FROM samples_run")
    return con.sql(" UNION ALL ".join(parts)).to_arrow_table()


# --- across runs and sources ---------------------------------------------------------------------

def all_hashes(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """Every catalogued fingerprint of an `ok` shard, with the keep rule's source order
    (`source_rank`, by registration time), ordered by shard and key."""
    return con.sql(
        "SELECT h.source, h.shard, h.key, h.sha256, h.pixel_sha256, h.phash, h.width, h.height, "
        "dense_rank() OVER (ORDER BY s.added_at, s.name) AS source_rank "
        "FROM sample_hashes h JOIN sources s ON s.name = h.source "
        "JOIN shards sh ON sh.path = h.shard AND sh.status = 'ok' ORDER BY h.shard, h.key").to_arrow_table()


def decision_counts(con: duckdb.DuckDBPyConnection, shards: list[str]) -> dict[str, dict[str, int]]:
    """Rule -> {"kept": n, "dropped": n} over the decisions recorded for `shards`, by rule name."""
    rows = con.execute(
        "SELECT rule, count(*) FILTER (WHERE kept), count(*) FILTER (WHERE NOT kept) FROM sample_decisions "
        "WHERE list_contains(?::VARCHAR[], shard) GROUP BY rule ORDER BY rule", [shards]).fetchall()
    return {rule: {"kept": kept, "dropped": dropped} for rule, kept, dropped in rows}


# --- what the audit page shows -------------------------------------------------------------------

@dataclass
class ShardDecisions:
    """What curation recorded about some shards, as the audit page shows it."""

    members: list[tuple[str, str, bool, str, str, str | None]]  # (rule, cluster, kept, shard, key, reason)
    # of every duplicate cluster, by rule and cluster, the kept sample first
    dropped: list[tuple[str, str, str, str | None]]  # (rule, shard, key, reason) a filter dropped
    scores: list[tuple[str, float]]  # (name, value) of every recorded score
    reasons: list[tuple[str, str]]  # distinct (rule, reason) of the filters' drops


def shard_decisions(con: duckdb.DuckDBPyConnection, shards: list[str]) -> ShardDecisions | None:
    """The decisions and scores recorded for `shards`; None when the catalog has no curation
    tables or no decision about them."""
    if not con.execute("SELECT 1 FROM information_schema.tables WHERE table_name = 'sample_decisions'").fetchall():
        return None
    con.execute("CREATE TEMP TABLE audited AS SELECT unnest(?::VARCHAR[]) AS shard", [shards])
    decided = con.execute("SELECT count(*) FROM sample_decisions SEMI JOIN audited USING (shard)").fetchall()[0][0]
    if not decided:
        return None
    return ShardDecisions(
        members=con.execute(
            "SELECT rule, cluster, kept, shard, key, reason FROM sample_decisions SEMI JOIN audited USING (shard) "
            "WHERE cluster IS NOT NULL ORDER BY rule, cluster, kept DESC, shard, key").fetchall(),
        dropped=con.execute(
            "SELECT rule, shard, key, reason FROM sample_decisions SEMI JOIN audited USING (shard) "
            "WHERE NOT kept AND cluster IS NULL ORDER BY rule, shard, key").fetchall(),
        scores=con.execute("SELECT name, value FROM sample_scores SEMI JOIN audited USING (shard)").fetchall(),
        reasons=con.execute(
            "SELECT DISTINCT rule, reason FROM sample_decisions SEMI JOIN audited USING (shard) "
            "WHERE NOT kept AND cluster IS NULL AND reason IS NOT NULL").fetchall())


# --- what a mixture leaves out -------------------------------------------------------------------

def excluded_samples(con: duckdb.DuckDBPyConnection, source: str, rules: list[tuple[str, tuple[str, str, float] | None]]
                     ) -> tuple[list[str], list[tuple[str, str, str]]]:
    """The samples of `source` that `rules` leave out: each rule is (name, None) for a rule of
    `sample_decisions` (the samples it did not keep), or (name, (score, "below"|"above", x)) for a
    threshold evaluated on `sample_scores`.

    Returns the rules applied (those decided, or scored, for the source; in the order given) and
    one (shard, key, rule) row per sample and rule that leaves it out.
    """
    parts, params, applied = [], [], []
    for rule, threshold in rules:
        if threshold is None:
            if not con.execute("SELECT 1 FROM sample_decisions WHERE source = ? AND rule = ? LIMIT 1",
                               [source, rule]).fetchone():
                continue
            parts.append("SELECT shard, key, ? AS rule FROM sample_decisions WHERE source = ? AND rule = ? AND NOT kept")
            params += [rule, source, rule]
        else:
            score, op, x = threshold
            if not con.execute("SELECT 1 FROM sample_scores WHERE source = ? AND name = ? LIMIT 1",
                               [source, score]).fetchone():
                continue
            parts.append(f"SELECT shard, key, ? AS rule FROM sample_scores WHERE source = ? AND name = ? "
                         f"AND value {'<' if op == 'below' else '>'} ?")
            params += [rule, source, score, x]
        applied.append(rule)
    if not parts:
        return applied, []
    return applied, con.execute(" UNION ALL ".join(parts), params).fetchall()


def score_generators(con, source: str, name: str) -> dict[str, str]:
    """shard -> the `generator` of its `name` score rows in `source` (what computed them, from which tar)."""
    return dict(con.execute("SELECT shard, any_value(generator) FROM sample_scores WHERE source = ? AND name = ? "
                            "GROUP BY shard", [source, name]).fetchall())
