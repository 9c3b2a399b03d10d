"""The DuckDB catalog: every source, shard, sample, mixture and training run, queryable with SQL.

Default file `./catalog.duckdb`; every command takes `--db PATH` and honours `BLIP3_DB`.

Tables (columns documented in README "The catalog"):

- `sources`   one row per registered source (name, kind, path, counts, tokens, meta JSON)
- `shards`    one row per shard tar (path, source, index, sha256, size, counts, status)
              status is `ok`, or `changed` when the tar on disk no longer matches the sha256
              recorded when it was added (flagged, never silently re-read)
- `samples`   one row per input sample of every shard, failures included: the sidecar parquet
              columns (core.shards.SIDECAR_SCHEMA, img2dataset's names) but the caption text,
              plus `source` and `shard`
- `sample_hashes`, `sample_scores`, `sample_decisions`, `benchmark_matches`   what `blip3 curate`
              computed and decided per sample (core.curation; nothing is deleted from the shards);
              `blip3 recaption` adds its quality scores to `sample_scores` (datagen/recaption_scores.py)
- `mixtures`, `mixture_sources`, `mixture_curation`   mixtures built by `blip3 mix build`, their
              per-source plan, and how many samples each curation rule left out per source
- `runs`      training runs recorded by `blip3 train` (stage, manifest, steps, tokens, loss, ckpt)
- `evals`     benchmark results recorded by `blip3 eval`: one row per (checkpoint, task, shots,
              metric), with the run that trained the checkpoint and its per-sample predictions

Adding is idempotent: a shard already catalogued with the same sha256 is skipped, so adding the
same folder twice leaves the row counts unchanged. Shards are added in batches (REGISTER_BATCH):
one transaction and one `INSERT ... SELECT` over the batch's sidecar parquets each, so the cost is
per batch, not per shard. A folder may be on an object store (core.storage.Location): shards are then
catalogued under their URLs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from blip3.core.errors import UserError
from blip3.core.logs import get_logger
from blip3.core.records import RECORD_KINDS
from blip3.core.shards import SHARD_DIGITS, SIDECAR_COLUMNS, Shard, shard_name
from blip3.core.storage import Location, as_location

DEFAULT_DB = "catalog.duckdb"
SOURCE_KINDS = tuple(RECORD_KINDS)  # caption, interleaved, sft, dpo: one record type each
#: Shards registered per transaction: one `INSERT ... SELECT` over the batch's sidecars. The datagen
#: driver writes once per batch as shards finish, so a killed driver loses at most one batch's
#: registration (the re-run registers it: adding is idempotent).
REGISTER_BATCH = 64

log = get_logger("catalog")

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS sources (
        name VARCHAR PRIMARY KEY,
        kind VARCHAR NOT NULL,
        path VARCHAR NOT NULL,
        n_shards BIGINT DEFAULT 0,
        n_samples BIGINT DEFAULT 0,
        n_tokens BIGINT,
        added_at TIMESTAMPTZ,
        updated_at TIMESTAMPTZ,
        meta JSON
    )""",
    """CREATE TABLE IF NOT EXISTS shards (
        path VARCHAR PRIMARY KEY,
        source VARCHAR NOT NULL,
        idx INTEGER,
        sha256 VARCHAR NOT NULL,
        tar_bytes BIGINT,
        n_samples INTEGER,
        n_success INTEGER,
        n_failed INTEGER,
        n_tokens BIGINT,
        generator JSON,
        status VARCHAR DEFAULT 'ok',
        added_at TIMESTAMPTZ,
        checked_at TIMESTAMPTZ
    )""",
    """CREATE TABLE IF NOT EXISTS samples (
        source VARCHAR NOT NULL,
        shard VARCHAR NOT NULL,
        key VARCHAR, uid VARCHAR, url VARCHAR,
        status VARCHAR, error_message VARCHAR,
        width INTEGER, height INTEGER, original_width INTEGER, original_height INTEGER, sha256 VARCHAR,
        image_bytes BIGINT, caption_length INTEGER, n_captions INTEGER,
        n_ocr INTEGER, n_objects INTEGER, mean_confidence FLOAT, has_source_caption BOOLEAN
    )""",
    # Re-registering a shard deletes its rows by `shard`: with this index that costs the same at
    # 1M and 10M rows (a full scan without it), for about twice the bulk insert time.
    "CREATE INDEX IF NOT EXISTS samples_by_shard ON samples (shard)",
    # Curation (`blip3 curate`, datagen/curate.py): per-sample fingerprints, scores and decisions,
    # keyed like `samples` by (shard, key). Each is replaced shard by shard (`core.curation`), with
    # `shard = ?` deletes through these indexes, so a re-run costs the same at any table size.
    """CREATE TABLE IF NOT EXISTS sample_hashes (
        source VARCHAR NOT NULL, shard VARCHAR NOT NULL, key VARCHAR NOT NULL,
        sha256 VARCHAR,          -- of the image member's bytes
        pixel_sha256 VARCHAR,    -- of the decoded RGB pixels and size: the same picture re-encoded
        phash UBIGINT,           -- 64-bit DCT perceptual hash (imagehash.phash bit order)
        width INTEGER, height INTEGER, image_bytes BIGINT
    )""",
    "CREATE INDEX IF NOT EXISTS sample_hashes_by_shard ON sample_hashes (shard)",
    """CREATE TABLE IF NOT EXISTS sample_scores (
        source VARCHAR NOT NULL, shard VARCHAR NOT NULL, key VARCHAR NOT NULL,
        name VARCHAR NOT NULL,   -- clip, blur, aspect, caption_words, lang_score, ...
        value DOUBLE,
        generator VARCHAR        -- what computed it (model, version)
    )""",
    "CREATE INDEX IF NOT EXISTS sample_scores_by_shard ON sample_scores (shard)",
    """CREATE TABLE IF NOT EXISTS sample_decisions (
        source VARCHAR NOT NULL, shard VARCHAR NOT NULL, key VARCHAR NOT NULL,
        rule VARCHAR NOT NULL,   -- exact_dup, near_dup, sem_dup, decontam, min_side, aspect, clip, ...
        kept BOOLEAN NOT NULL,
        reason VARCHAR,          -- why it was dropped (or, in a duplicate cluster, why it was kept)
        cluster VARCHAR          -- duplicate rules: the cluster (the key of the sample kept in it)
    )""",
    "CREATE INDEX IF NOT EXISTS sample_decisions_by_shard ON sample_decisions (shard)",
    """CREATE TABLE IF NOT EXISTS benchmark_matches (
        source VARCHAR NOT NULL, shard VARCHAR NOT NULL, key VARCHAR NOT NULL,
        task VARCHAR NOT NULL,   -- the `blip3 eval` task whose image it is
        image VARCHAR,           -- the benchmark image (file, or row of an inline-image table)
        question_ids VARCHAR[],  -- the task's questions about that image
        match VARCHAR,           -- sha256 | pixels | phash
        distance INTEGER         -- Hamming distance of the perceptual hashes
    )""",
    "CREATE INDEX IF NOT EXISTS benchmark_matches_by_shard ON benchmark_matches (shard)",
    """CREATE TABLE IF NOT EXISTS mixtures (
        name VARCHAR PRIMARY KEY,
        manifest_path VARCHAR,
        seed BIGINT,
        weight_by VARCHAR,
        target_samples BIGINT,
        target_tokens BIGINT,
        created_at TIMESTAMPTZ,
        spec JSON
    )""",
    """CREATE TABLE IF NOT EXISTS mixture_sources (
        mixture VARCHAR NOT NULL,
        source VARCHAR NOT NULL,
        kind VARCHAR,
        weight DOUBLE,
        available_samples BIGINT,
        available_tokens BIGINT,
        target_samples BIGINT,
        target_tokens BIGINT,
        epochs DOUBLE,
        sample_weight DOUBLE,   -- share of samples the loader draws (= weight unless weight_by tokens)
        n_shards INTEGER,
        tokenizer VARCHAR       -- how tokens were counted (`estimate:...` or `hf:NAME`)
    )""",
    """CREATE TABLE IF NOT EXISTS mixture_curation (
        mixture VARCHAR NOT NULL,
        source VARCHAR NOT NULL,
        rule VARCHAR NOT NULL,
        removed BIGINT          -- samples of the source this rule left out (one may fall to several rules)
    )""",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY,
        stage VARCHAR,
        kind VARCHAR,
        config_path VARCHAR,
        manifest VARCHAR,
        started_at TIMESTAMPTZ,
        finished_at TIMESTAMPTZ,
        steps BIGINT,
        tokens BIGINT,
        final_loss DOUBLE,
        checkpoint VARCHAR,
        status VARCHAR,
        metrics_path VARCHAR
    )""",
    """CREATE TABLE IF NOT EXISTS evals (
        run_id VARCHAR,             -- the training run whose output was evaluated (NULL: not trained here)
        checkpoint VARCHAR NOT NULL,
        task VARCHAR NOT NULL,
        shots INTEGER NOT NULL,
        metric VARCHAR NOT NULL,
        value DOUBLE,
        n BIGINT,                   -- questions / images scored
        evaluated_at TIMESTAMPTZ,
        predictions_path VARCHAR    -- per-sample parquet: id, prompt, prediction, answer, score
    )""",
]


#: Sidecar columns copied into `samples`: all but the caption text (the tars hold it; the catalog
#: keeps its length), which would make the catalog as large as the captions.
SAMPLE_COLUMNS = [c for c in SIDECAR_COLUMNS if c != "caption"]

#: Columns renamed to img2dataset's names; a catalog made before is renamed on open.
_RENAMED = {"error": "error_message", "orig_width": "original_width", "orig_height": "original_height"}


def _migrate_samples(con: duckdb.DuckDBPyConnection) -> None:
    """Bring a `samples` table made by an earlier version to the current columns (renamed, added);
    runs before SCHEMA, which (re)creates the index a rename must not hold."""
    have = {r[0] for r in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'samples'").fetchall()}
    renames = [(old, new) for old, new in _RENAMED.items() if old in have and new not in have]
    if renames:
        con.execute("DROP INDEX IF EXISTS samples_by_shard")
    for old, new in renames:
        con.execute(f"ALTER TABLE samples RENAME COLUMN {old} TO {new}")
    if have and "sha256" not in have:
        con.execute("ALTER TABLE samples ADD COLUMN sha256 VARCHAR")


def resolve_db(db: str | Path | None = None) -> Path:
    """`--db` if given, else `$BLIP3_DB`, else `./catalog.duckdb`."""
    return Path(db or os.environ.get("BLIP3_DB") or DEFAULT_DB)


#: DuckDB's file header: an 8-byte checksum, then this magic. DuckDB itself opens an existing CSV,
#: JSON or Parquet file given as a database as a read-only in-memory view of it (writes then vanish),
#: so the header is checked before DuckDB sees the path.
_DUCKDB_MAGIC = (8, b"DUCK")


def check_catalog_file(path: Path) -> None:
    """Refuse a `--db` that exists but is not a DuckDB database file (a folder, a CSV, a Parquet,
    an empty file); a path that does not exist yet is fine: the catalog is created there."""
    if not path.exists():
        return
    if not path.is_file():
        raise UserError("not a DuckDB catalog file (a folder)", file=path, field="--db")
    offset, magic = _DUCKDB_MAGIC
    try:
        with open(path, "rb") as f:
            head = f.read(offset + len(magic))
    except OSError as e:
        raise UserError(f"cannot read the catalog: {e.strerror}", file=path, field="--db") from None
    if head[offset:] != magic:
        raise UserError("not a DuckDB catalog file (give a .duckdb file, or a path that does not exist yet)",
                        file=path, field="--db")


LOCK_WAIT_S = 10.0  # default for $BLIP3_LOCK_WAIT: how long to wait for another blip3 process's lock
BATCH_LOCK_WAIT_S = 0.5  # how long the datagen driver waits to write a batch (it retries at the next)


def open_catalog(path: Path, *, read_only: bool = False, config: dict[str, Any] | None = None,
                 lock_wait: float | None = None) -> duckdb.DuckDBPyConnection:
    """Connect to the catalog file, waiting a bounded time while another process holds its lock.

    DuckDB lets one process write a file at a time (and none read it meanwhile); a second `blip3`
    command started during a long `catalog add` retries for `$BLIP3_LOCK_WAIT` seconds (default
    10; `lock_wait` instead when given) and then says who holds the lock, in one line. A file that
    is not a DuckDB database (`check_catalog_file`) is a UserError naming it, not a traceback.
    """
    wait_s = float(os.environ.get("BLIP3_LOCK_WAIT") or LOCK_WAIT_S) if lock_wait is None else lock_wait
    check_catalog_file(path)
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only, config=config or {})
        except duckdb.IOException as e:
            message = " ".join(str(e).split())
            if "Could not set lock" in message:
                if time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                holder = message.split("Conflicting lock is held in", 1)[-1].split(". See also")[0].strip()
                raise UserError(f"catalog is locked by another process ({holder}); waited {wait_s:g}s "
                                "(set BLIP3_LOCK_WAIT to wait longer)", file=path) from None
            if "not a valid DuckDB database" in message:
                raise UserError("not a DuckDB catalog file", file=path, field="--db") from None
            raise UserError(f"cannot open the catalog: {message}", file=path) from None


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """All of the block's statements or none: committed at the end, rolled back (and the error
    raised again) when the block fails."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class SourceRow:
    """One row of `sources`; `meta` parsed (how its tokens were counted, ...)."""

    name: str
    kind: str
    path: str
    n_shards: int
    n_samples: int
    n_tokens: int | None
    meta: dict[str, Any]


@dataclass
class ShardRow:
    """The columns of a `shards` row a mixture is built from."""

    path: str
    sha256: str
    tar_bytes: int
    n_success: int | None
    n_tokens: int | None
    status: str


@dataclass
class AddResult:
    source: str
    added: int = 0
    skipped: int = 0
    changed: int = 0
    rows: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (shard path, reason): not registered

    def check(self) -> "AddResult":
        """Raise a UserError with the summary when a shard was not registered (for callers whose
        job is otherwise done: the user must learn that the catalog lacks part of the folder)."""
        if self.failed:
            raise UserError(f"{self.summary()}; fix it and run `blip3 catalog add` on the folder again")
        return self

    def summary(self) -> str:
        """One line: what was registered and, when some shards were not, how many and the first."""
        line = f"{self.source}: {self.added} shard(s) added ({self.rows} rows), {self.skipped} already catalogued"
        if self.changed:
            line += f", {self.changed} changed on disk (flagged)"
        if self.failed:
            path, reason = self.failed[0]
            line += f"; {len(self.failed)} shard(s) NOT registered, first: {path}: {reason}"
        return line


class Catalog:
    """A read-write handle on the catalog file (queries from users go through `core.sql`)."""

    def __init__(self, db: str | Path | None = None, *, lock_wait: float | None = None):
        self.path = resolve_db(db)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the catalog's folder: {e.strerror}", file=self.path.parent) from None
        self.con = open_catalog(self.path, lock_wait=lock_wait)
        _migrate_samples(self.con)
        for ddl in SCHEMA:
            self.con.execute(ddl)
        from blip3.core.views import create_views  # views over the tables above, one place

        create_views(self.con)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sources and shards ------------------------------------------------------------------
    def upsert_source(self, name: str, kind: str, path: str | Path, meta: dict | None = None) -> None:
        if kind not in SOURCE_KINDS:
            raise UserError(f"unknown source kind {kind!r}; one of {', '.join(SOURCE_KINDS)}", field="kind")
        path = as_location(path).url
        row = self.con.execute("SELECT kind, path FROM sources WHERE name = ?", [name]).fetchone()
        if row is None:
            self.con.execute(
                "INSERT INTO sources (name, kind, path, added_at, updated_at, meta) VALUES (?, ?, ?, ?, ?, ?)",
                [name, kind, path, _now(), _now(), json.dumps(meta or {})],
            )
        else:
            if row[0] != kind:
                raise UserError(f"source {name!r} is already registered with kind {row[0]!r}", field="kind")
            self.con.execute(
                "UPDATE sources SET path = ?, updated_at = ?, meta = coalesce(?, meta) WHERE name = ?",
                [path, _now(), None if meta is None else json.dumps(meta), name],
            )

    def add_output(
        self, out_dir: str | Path, *, source: str | None = None, kind: str = "caption", refresh: bool = False,
        verify: bool = False, storage_options: dict[str, Any] | None = None,
    ) -> AddResult:
        """Register the finished shards of `out_dir` (a local folder or an object-store URL, with
        `storage_options` for its filesystem) and their sidecar rows.

        A shard already catalogued with the same sha256 is skipped; one whose tar changed since is
        flagged `changed` (and re-read only with `refresh=True`). The sha256 is the one the writer
        computed while writing (in the stats), checked against the tar's size; `verify=True`
        re-hashes every tar (a full read of the corpus).
        """
        folder = as_location(out_dir, storage_options)
        if not folder.exists():
            raise UserError("no such folder", file=folder.url)
        shards = folder.finished()
        sizes = folder.tar_sizes()
        unlisted = folder.tars_without_stats(shards, sizes)
        if not shards:
            more = f"; {len(unlisted)} tar(s) without a readable stats file, first: {unlisted[0][0]}" if unlisted else ""
            raise UserError(f"no finished shards (NNNNNN_stats.json) found{more}", file=folder.url)
        name = source or folder.name
        self.upsert_source(name, kind, folder.url)
        result = self.register(folder, shards, name, refresh=refresh, verify=verify, sizes=sizes)
        result.failed.extend(unlisted)
        return result

    def register(self, folder: Location, shards: list[Shard], source: str, *, refresh: bool = False,
                 verify: bool = False, sizes: dict[str, int] | None = None) -> AddResult:
        """Register, skip or flag `shards` of `folder` under the (registered) `source`, in batches
        of REGISTER_BATCH shards: one transaction and one INSERT ... SELECT over the batch's
        sidecars each, so the cost is per batch, not per shard."""
        from blip3.core.logs import progress

        result = AddResult(source=source)
        sizes = folder.tar_sizes(shards) if sizes is None else sizes
        known = self._known_shards([s.tar for s in shards])
        fresh: list[Shard] = []
        seen: list[str] = []
        for info in shards:
            # One bad shard (a vanished tar, a corrupt sidecar) is reported, never a reason to
            # leave the rest of the folder unregistered.
            try:
                outcome = self._classify(folder, info, sizes, known.get(info.tar), refresh, verify, source)
            except (duckdb.Error, OSError, UserError) as e:
                result.failed.append((info.tar, " ".join(str(e).split())[:300]))
                continue
            if outcome == "add":
                fresh.append(info)
            elif outcome == "skip":
                seen.append(info.tar)
                result.skipped += 1
            else:
                result.changed += 1
        if seen:
            self.con.execute("UPDATE shards SET checked_at = ?, status = 'ok' "
                             "WHERE path IN (SELECT unnest(?::VARCHAR[]))", [_now(), seen])
        with progress(transient=True) as bar:
            task = bar.add_task(f"catalog add {source}", total=len(fresh))
            for start in range(0, len(fresh), REGISTER_BATCH):
                batch = fresh[start:start + REGISTER_BATCH]
                self._insert_batch(folder, batch, source, result)
                bar.advance(task, len(batch))
        self.refresh_source_counts(source)
        return result

    def _known_shards(self, paths: list[str]) -> dict[str, tuple[str, str]]:
        """(sha256, status) of the catalogued shards among `paths`, by path: one query."""
        rows = self.con.execute("SELECT path, sha256, status FROM shards WHERE path IN (SELECT unnest(?::VARCHAR[]))",
                                [paths]).fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def _classify(self, folder: Location, info: Shard, sizes: dict[str, int],
                  known: tuple[str, str] | None, refresh: bool, verify: bool, source: str) -> str:
        """"add", "skip" or "changed" (flagged here) for one finished shard."""
        size = sizes.get(info.tar)
        if size is None:
            raise UserError("stats file present but tar missing")
        sha = folder.sha256(info.tar.rsplit("/", 1)[-1]) if verify or size != info.tar_bytes else info.sha256
        if sha != info.sha256:
            # The tar on disk is not the one its stats describe: flag, do not trust the sidecar.
            self._flag_changed(info.tar, source, info, sha)
            return "changed"
        if known is not None and known[0] == sha and known[1] == "changed" and not verify:
            return "changed"  # flagged by an earlier re-hash; only another re-hash clears it
        if known is not None and known[0] == sha:
            return "skip"
        if known is not None and not refresh:
            self.con.execute("UPDATE shards SET status = 'changed', checked_at = ? WHERE path = ?", [_now(), info.tar])
            return "changed"
        return "add"

    def _insert_batch(self, folder: Location, batch: list[Shard], source: str, result: AddResult) -> None:
        """Replace the rows of a batch of shards in one transaction; when that fails (a corrupt
        sidecar), each shard on its own, so only the bad one is reported."""
        try:
            with transaction(self.con):
                self._replace_shards(folder, batch, source)
        except (duckdb.Error, OSError, UserError) as e:
            if len(batch) == 1:
                result.failed.append((batch[0].tar, " ".join(str(e).split())[:300]))
                return
            for info in batch:
                self._insert_batch(folder, [info], source, result)
            return
        result.added += len(batch)
        result.rows += sum(s.count for s in batch)

    def _replace_shards(self, folder: Location, batch: list[Shard], source: str) -> None:
        """Delete, then insert, the `shards` and `samples` rows of `batch`; call it inside a
        `transaction`. Local sidecars are read by DuckDB itself (`read_parquet` over the batch's
        files); an object store's through fsspec, as one Arrow table."""
        cols = ", ".join(SAMPLE_COLUMNS)
        tars = [s.tar for s in batch]
        self._delete_shards(tars)
        insert = f"INSERT INTO samples (source, shard, {cols}) SELECT ?, "
        if folder.is_local:
            self.con.execute(
                insert + f"m.tar, {cols} FROM read_parquet(?::VARCHAR[], filename = true) p "
                "JOIN (SELECT unnest(?::VARCHAR[]) AS parquet, unnest(?::VARCHAR[]) AS tar) m ON m.parquet = p.filename",
                [source, [s.parquet for s in batch], [s.parquet for s in batch], tars])
        else:
            self.con.register("_batch_rows", folder.sidecars(batch))
            try:
                self.con.execute(insert + f"shard, {cols} FROM _batch_rows", [source])
            finally:
                self.con.unregister("_batch_rows")
        self._insert_shard_rows(batch, source)

    def _delete_shards(self, tars: list[str]) -> None:
        """Remove the rows of those of `tars` that are catalogued (re-registration), one `shard = ?`
        each: DuckDB answers an equality through `samples_by_shard`, so this costs the same
        whatever the table size (an `IN` list is a full scan)."""
        known = [[r[0]] for r in self.con.execute(
            "SELECT path FROM shards WHERE path IN (SELECT unnest(?::VARCHAR[]))", [tars]).fetchall()]
        if known:
            self.con.executemany("DELETE FROM samples WHERE shard = ?", known)
            self.con.executemany("DELETE FROM shards WHERE path = ?", known)
            # What curation recorded about the old tar no longer describes the new one.
            for table in ("sample_hashes", "sample_scores", "sample_decisions", "benchmark_matches"):
                self.con.executemany(f"DELETE FROM {table} WHERE shard = ?", known)

    def _insert_shard_rows(self, shards: list, source: str, tokens: list[int | None] | None = None) -> None:
        now = _now()
        self.con.executemany(
            "INSERT INTO shards (path, source, idx, sha256, tar_bytes, n_samples, n_success, n_failed, n_tokens, "
            "generator, status, added_at, checked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'ok', ?, ?)",
            [[str(s.tar), source, s.index, s.sha256, s.tar_bytes, s.count, s.successes, s.failed,
              None if tokens is None else tokens[i], json.dumps(s.generator), now, now]
             for i, s in enumerate(shards)],
        )

    def _flag_changed(self, tar: str, source: str, info: Shard, sha: str) -> None:
        if self.con.execute("SELECT 1 FROM shards WHERE path = ?", [tar]).fetchone():
            self.con.execute("UPDATE shards SET status = 'changed', checked_at = ? WHERE path = ?", [_now(), tar])
        else:
            self.con.execute(
                "INSERT INTO shards (path, source, idx, sha256, tar_bytes, status, added_at, checked_at) "
                "VALUES (?, ?, ?, ?, ?, 'changed', ?, ?)",
                [tar, source, info.index, sha, info.tar_bytes, _now(), _now()],
            )

    def add_shards(self, source: str, shards: list[tuple[Shard, pa.Table, int]]) -> int:
        """Insert shards read from tars without sidecars (`info`, their sample rows, their token
        count) all in one transaction: all of them or none. Returns how many."""
        cols = ", ".join(SAMPLE_COLUMNS)
        with transaction(self.con):
            self._delete_shards([str(info.tar) for info, _, _ in shards])
            for info, rows, _ in shards:
                self.con.register("_shard_rows", rows)
                try:
                    self.con.execute(f"INSERT INTO samples (source, shard, {cols}) SELECT ?, ?, {cols} FROM _shard_rows",
                                     [source, str(info.tar)])
                finally:
                    self.con.unregister("_shard_rows")
            self._insert_shard_rows([info for info, _, _ in shards], source, [tokens for _, _, tokens in shards])
        return len(shards)

    def shard_sha256(self, path: str) -> str | None:
        """The sha256 a catalogued shard was added with (None when it is not catalogued)."""
        row = self.con.execute("SELECT sha256 FROM shards WHERE path = ?", [path]).fetchone()
        return None if row is None else row[0]

    def shard_owner(self, paths: list[str], *, other_than: str) -> tuple[str, str] | None:
        """(path, source) of the first of `paths` catalogued under a source other than `other_than`."""
        return self.con.execute(
            "SELECT path, source FROM shards WHERE source <> ? AND path IN (SELECT unnest(?::VARCHAR[])) ORDER BY path",
            [other_than, paths],
        ).fetchone()

    def source_shards(self, name: str, *, counted_only: bool = False, ok_only: bool = False) -> list[ShardRow]:
        """The catalogued shards of a source, by path."""
        where = " AND n_tokens IS NOT NULL" if counted_only else ""
        where += " AND status = 'ok'" if ok_only else ""
        rows = self.con.execute(
            f"SELECT path, sha256, tar_bytes, n_success, n_tokens, status FROM shards WHERE source = ?{where} ORDER BY path",
            [name],
        ).fetchall()
        return [ShardRow(*r) for r in rows]

    def set_shard_tokens(self, tokens: dict[str, int]) -> None:
        """Token counts of shards, by path."""
        for path, n in tokens.items():
            self.con.execute("UPDATE shards SET n_tokens = ? WHERE path = ?", [n, path])

    def source(self, name: str) -> SourceRow | None:
        """A registered source (None when there is none by that name)."""
        row = self.con.execute(
            "SELECT name, kind, path, n_shards, n_samples, n_tokens, meta FROM sources WHERE name = ?", [name]
        ).fetchone()
        return None if row is None else SourceRow(*row[:6], meta=json.loads(row[6] or "{}"))

    def source_names(self) -> list[str]:
        return [r[0] for r in self.con.execute("SELECT name FROM sources ORDER BY name").fetchall()]

    def set_source_meta(self, name: str, meta: dict[str, Any]) -> None:
        self.con.execute("UPDATE sources SET meta = ? WHERE name = ?", [json.dumps(meta), name])

    def drop_source(self, name: str) -> None:
        """Remove a source row that has no shards (a first add that failed leaves nothing behind)."""
        if self.con.execute("SELECT 1 FROM shards WHERE source = ?", [name]).fetchone():
            raise ValueError(f"source {name!r} has shards; drop_source only removes an empty source")
        self.con.execute("DELETE FROM sources WHERE name = ?", [name])

    def refresh_source_counts(self, name: str) -> None:
        """Shards, samples and tokens of a source from its `ok` shards (tokens NULL while none is counted)."""
        self.con.execute(
            """UPDATE sources SET
                 n_shards = (SELECT count(*) FROM shards WHERE source = $n AND status = 'ok'),
                 n_samples = (SELECT coalesce(sum(n_success), 0) FROM shards WHERE source = $n AND status = 'ok'),
                 n_tokens = (SELECT sum(n_tokens) FROM shards WHERE source = $n AND status = 'ok'),
                 updated_at = $now
               WHERE name = $n""",
            {"n": name, "now": _now()},
        )

    # -- mixtures ------------------------------------------------------------------------------
    def record_mixture(self, manifest: Any, spec: dict[str, Any]) -> None:
        """Replace a mixture's rows in `mixtures` and `mixture_sources` (`manifest` is a
        `mixture.manifest.Manifest`, `spec` the validated spec it was built from)."""
        path = None if manifest.path is None else str(Path(manifest.path).resolve())
        with transaction(self.con):
            self.con.execute("DELETE FROM mixture_sources WHERE mixture = ?", [manifest.name])
            self.con.execute("DELETE FROM mixture_curation WHERE mixture = ?", [manifest.name])
            self.con.execute("DELETE FROM mixtures WHERE name = ?", [manifest.name])
            self.con.execute(
                "INSERT INTO mixtures (name, manifest_path, seed, weight_by, target_samples, target_tokens, created_at, "
                "spec) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [manifest.name, path, manifest.seed, manifest.weight_by, manifest.target["samples"],
                 manifest.target["tokens"], datetime.fromisoformat(manifest.created_at), json.dumps(spec)],
            )
            for s in manifest.sources:
                self.con.execute(
                    "INSERT INTO mixture_sources (mixture, source, kind, weight, sample_weight, available_samples, "
                    "available_tokens, target_samples, target_tokens, epochs, n_shards, tokenizer) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [manifest.name, s.name, s.kind, s.weight, s.sample_weight, s.samples, s.tokens, s.target_samples,
                     s.target_tokens, s.epochs, len(s.shards), manifest.tokenizer],
                )
                for rule, removed in (s.curation or {}).items():
                    self.con.execute("INSERT INTO mixture_curation VALUES (?, ?, ?, ?)",
                                     [manifest.name, s.name, rule, removed])

    # -- runs ----------------------------------------------------------------------------------
    def record_run(self, **fields: Any) -> None:
        """Insert or replace one row of `runs` (keys are its column names; run_id required)."""
        if "run_id" not in fields:
            raise ValueError("record_run needs run_id")
        cols = list(fields)
        self.con.execute("DELETE FROM runs WHERE run_id = ?", [fields["run_id"]])
        self.con.execute(
            f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
            [fields[c] for c in cols],
        )

    def run_for_checkpoint(self, checkpoint: str | Path) -> str | None:
        """The run_id of the training run that wrote this model directory (None when unknown)."""
        row = self.con.execute("SELECT run_id FROM runs WHERE checkpoint = ? ORDER BY finished_at DESC NULLS LAST",
                               [str(Path(checkpoint).resolve())]).fetchone()
        return None if row is None else row[0]

    # -- evals ---------------------------------------------------------------------------------
    def record_eval(self, *, checkpoint: str | Path, task: str, shots: int, metrics: dict[str, float], n: int,
                    run_id: str | None = None, predictions_path: str | Path | None = None) -> None:
        """Replace the rows of one (checkpoint, task, shots) evaluation, all metrics at once."""
        ckpt = str(Path(checkpoint).resolve())
        preds = None if predictions_path is None else str(Path(predictions_path).resolve())
        with transaction(self.con):
            self.con.execute("DELETE FROM evals WHERE checkpoint = ? AND task = ? AND shots = ?", [ckpt, task, shots])
            for metric, value in metrics.items():
                self.con.execute(
                    "INSERT INTO evals (run_id, checkpoint, task, shots, metric, value, n, evaluated_at, predictions_path) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [run_id, ckpt, task, shots, metric, float(value), n, _now(), preds],
                )


class BatchRegistrar:
    """The datagen driver's catalog writes during a job: the shards the workers report finished
    are registered REGISTER_BATCH at a time, not all at the job's end.

    Each batch opens the catalog, writes one transaction and closes it, so `blip3 sql` can read the
    catalog between batches. A driver killed mid-job loses at most the batch it was collecting; the
    re-run's `add_output` over the folder registers it (adding is idempotent). A batch that cannot
    be written now (the catalog locked by another process) stays pending for the next one: the
    driver waits at most BATCH_LOCK_WAIT_S for the lock, never stalling the job's dispatch.
    """

    def __init__(self, db: str | Path | None, location: str | Path | Location, *, source: str | None = None,
                 kind: str = "caption", storage_options: dict[str, Any] | None = None, digits: int = SHARD_DIGITS,
                 batch: int | None = None):
        self.db, self.kind, self.digits, self.batch = db, kind, digits, batch or REGISTER_BATCH
        self.folder = as_location(location, storage_options)
        self.source = source or self.folder.name
        self.pending: list[int] = []
        self.batches = 0  # batches written

    def add(self, index: int) -> None:
        """Shard `index` is finished (published by its worker)."""
        self.pending.append(index)
        if len(self.pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        """Register the pending shards now (one transaction)."""
        if not self.pending:
            return
        try:
            with Catalog(self.db, lock_wait=BATCH_LOCK_WAIT_S) as cat:
                cat.upsert_source(self.source, self.kind, self.folder.url)
                cat.register(self.folder, self.folder.finished([shard_name(i, self.digits) for i in self.pending]),
                             self.source)
        except UserError as e:  # locked, most likely: the next batch (or the job's end) tries again
            log.warning(f"catalog not updated yet ({e}); retrying with the next batch")
            return
        self.pending.clear()
        self.batches += 1
