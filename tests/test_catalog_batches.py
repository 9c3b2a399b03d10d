"""Catalog registration in batches: one INSERT ... SELECT over a batch of sidecars, and the datagen
driver registering its shards batch by batch as they finish (real DuckDB, real Ray, real tars)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import duckdb
import pytest

import blip3.core.catalog
from blip3.core.catalog import BatchRegistrar, Catalog
from blip3.core.errors import UserError
from blip3.core.storage import Location
from blip3.core.shards import shard_paths
from blip3.datagen.pipeline import JobOptions, run_job
from tests.core_fixtures import write_caption_shard
from tests.test_datagen_pipeline import SizeCaptioner
from tests.test_datagen_scale import _images


def _rows(db: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


@pytest.fixture
def five_shards(tmp_path) -> Path:
    out = tmp_path / "five"
    for i in range(5):
        write_caption_shard(out, i, 3, n_failed=i % 2)
    return out


def test_shards_are_inserted_one_batch_per_statement(five_shards, tmp_path, monkeypatch):
    """5 shards, batches of 2: three INSERT ... SELECT statements, every row once, by its shard."""
    monkeypatch.setattr(blip3.core.catalog, "REGISTER_BATCH", 2)
    batches: list[list[int]] = []
    replace = Catalog._replace_shards

    def counting(self, folder, batch, source):
        batches.append([s.index for s in batch])
        return replace(self, folder, batch, source)

    monkeypatch.setattr(Catalog, "_replace_shards", counting)
    db = tmp_path / "c.duckdb"
    with Catalog(db) as cat:
        r = cat.add_output(five_shards)
    assert batches == [[0, 1], [2, 3], [4]]
    assert (r.added, r.rows) == (5, 17)
    per_shard = _rows(db, "SELECT s.idx, count(*) FROM samples JOIN shards s ON s.path = samples.shard "
                          "GROUP BY ALL ORDER BY 1")
    assert per_shard == [(0, 3), (1, 4), (2, 3), (3, 4), (4, 3)]  # each sidecar row under its own shard


def test_a_corrupt_sidecar_fails_alone_in_its_batch(five_shards, tmp_path, monkeypatch):
    """The batch with a corrupt sidecar is redone shard by shard: only that shard is reported."""
    monkeypatch.setattr(blip3.core.catalog, "REGISTER_BATCH", 4)
    shard_paths(five_shards, 2)[1].write_bytes(b"not parquet")
    db = tmp_path / "c.duckdb"
    with Catalog(db) as cat:
        r = cat.add_output(five_shards)
    assert r.added == 4 and [Path(p).name for p, _ in r.failed] == ["00002.tar"]
    assert _rows(db, "SELECT count(*) FROM samples WHERE shard LIKE '%00002.tar'") == [(0,)]
    assert _rows(db, "SELECT count(*) FROM samples") == [(17 - 3,)]


def test_reregistering_a_batch_replaces_its_rows(five_shards, tmp_path):
    """`refresh` after rewriting two shards: their rows are replaced, the others kept, no doubles."""
    db = tmp_path / "c.duckdb"
    with Catalog(db) as cat:
        cat.add_output(five_shards)
    for i in (1, 3):
        write_caption_shard(five_shards, i, 5, prefix="new")
    with Catalog(db) as cat:
        r = cat.add_output(five_shards, refresh=True)
    assert (r.added, r.skipped) == (2, 3)
    assert _rows(db, "SELECT count(*), count(DISTINCT key) FROM samples") == [(19, 19)]
    assert _rows(db, "SELECT count(*) FROM samples WHERE key LIKE 'new%'") == [(10,)]


def test_registrar_writes_each_batch_when_it_fills(five_shards, tmp_path):
    """Batches of 2: the catalog holds shards 0 and 1 as soon as the second is reported, before any
    end-of-job pass; the last partial batch waits for `flush`."""
    db = tmp_path / "c.duckdb"
    reg = BatchRegistrar(db, five_shards, source="five", batch=2)
    reg.add(0)
    assert not db.exists() or _rows(db, "SELECT count(*) FROM shards") == [(0,)]
    reg.add(1)
    assert _rows(db, "SELECT idx FROM shards ORDER BY idx") == [(0,), (1,)]
    reg.add(2)
    assert _rows(db, "SELECT count(*) FROM shards") == [(2,)]
    reg.flush()
    assert _rows(db, "SELECT idx FROM shards ORDER BY idx") == [(0,), (1,), (2,)]
    assert _rows(db, "SELECT n_shards, n_samples FROM sources WHERE name = 'five'") == [(3, 9)]
    assert reg.batches == 2


def test_registrar_keeps_a_batch_while_the_catalog_is_locked(five_shards, tmp_path, monkeypatch):
    """Another process holding the catalog does not stop the job: the batch waits for the next."""
    db = tmp_path / "c.duckdb"
    Catalog(db).close()
    monkeypatch.setenv("BLIP3_LOCK_WAIT", "3600")  # a command's wait: the driver does not use it
    reg = BatchRegistrar(db, five_shards, batch=1)
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(db)!r}); "
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        reg.add(0)
        assert reg.pending == [0] and reg.batches == 0
    finally:
        holder.kill()
        holder.wait()
    reg.add(1)
    assert reg.pending == [] and _rows(db, "SELECT idx FROM shards ORDER BY idx") == [(0,), (1,)]


class Fatal(BaseException):
    """Escapes the per-image error handling: the shard task itself fails."""


@dataclass
class FailOn(SizeCaptioner):
    fail_key: str = ""

    def annotate(self, image, sample):
        if sample.key == self.fail_key:
            raise Fatal("annotator crashed")
        return super().annotate(image, sample)


def test_job_registers_finished_shards_batch_by_batch(ray_local, tmp_path, monkeypatch):
    """A job whose last shard fails never reaches its end-of-job pass, yet its finished shards are
    catalogued (batches of one); the re-run registers the rest, each row once."""
    monkeypatch.setattr(blip3.core.catalog, "REGISTER_BATCH", 1)
    src = _images(tmp_path / "in", 6)
    out, db = tmp_path / "out", tmp_path / "c.duckdb"
    with pytest.raises(UserError, match="1 shard"):
        run_job(src, out, partial(FailOn, fail_key="img5"), JobOptions(workers=1, shard_size=2, db=db))
    assert _rows(db, "SELECT idx FROM shards ORDER BY idx") == [(0,), (1,)]
    r = run_job(src, out, SizeCaptioner, JobOptions(workers=1, shard_size=2, db=db))
    assert (r.shards_written, r.shards_skipped) == (1, 2)
    assert _rows(db, "SELECT count(*), count(DISTINCT key) FROM samples") == [(6, 6)]
    assert _rows(db, "SELECT n_shards FROM sources WHERE name = 'out'") == [(3,)]


def test_shard_folder_reads_only_the_named_shards(five_shards):
    folder = Location(five_shards)
    assert [s.index for s in folder.finished(["00001", "00003"])] == [1, 3]
    assert [s.index for s in folder.finished()] == [0, 1, 2, 3, 4]
