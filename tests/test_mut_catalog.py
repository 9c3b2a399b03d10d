"""The catalog's promises one by one, on real DuckDB files and real shards: the bounded lock wait
(held by a real second process; only the clock is a stand-in, so the back-off is exact and the
test never sleeps), source re-registration, shard flagging, the per-source queries, and the
mixture, run and eval records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

import blip3.core.catalog as catalog_module
from blip3.core.catalog import AddResult, BatchRegistrar, Catalog, open_catalog, resolve_db
from blip3.core.errors import UserError
from blip3.core.shards import file_sha256, shard_paths
from blip3.mixture.manifest import Manifest, ManifestSource, ShardRef
from tests.core_fixtures import write_caption_shard


class FakeClock:
    """`time` for the catalog module: sleeping advances the clock at once and is recorded."""

    def __init__(self, on_sleep=None):
        self.now = 100.0
        self.sleeps: list[float] = []
        self.on_sleep = on_sleep

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep(len(self.sleeps))


def hold_lock(db: Path) -> subprocess.Popen:
    """Another process with the catalog open for writing (DuckDB's file lock), until killed."""
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, sys; c = duckdb.connect({str(db)!r}); "
                               "print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def release(holder: subprocess.Popen) -> None:
    holder.stdin.close()
    holder.wait(timeout=30)


@pytest.fixture(scope="module")
def locked_db(tmp_path_factory):
    """A catalog file another process holds for the whole module."""
    db = tmp_path_factory.mktemp("locked") / "c.duckdb"
    Catalog(db).close()
    holder = hold_lock(db)
    yield db
    release(holder)


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(catalog_module, "time", fake)
    return fake


# -- the lock wait ---------------------------------------------------------------------------------
def test_lock_wait_backs_off_doubling_up_to_one_second(locked_db, clock):
    with pytest.raises(UserError, match=r"catalog is locked by another process \(.*PID \d+.*\); waited 3s") as e:
        open_catalog(locked_db, lock_wait=3.0)
    assert clock.sleeps == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    text = str(e.value)  # the holder only, not DuckDB's whole message
    assert "\n" not in text and str(locked_db) in text and "Could not set lock" not in text and "See also" not in text


def test_no_lock_wait_means_one_try(locked_db, clock):
    with pytest.raises(UserError, match="waited 0s"):
        open_catalog(locked_db, lock_wait=0)
    assert clock.sleeps == []


def test_lock_wait_from_the_environment_else_ten_seconds(locked_db, clock, monkeypatch):
    monkeypatch.setenv("BLIP3_LOCK_WAIT", "0.5")
    with pytest.raises(UserError, match="waited 0.5s"):
        open_catalog(locked_db)
    assert clock.sleeps == pytest.approx([0.05, 0.1, 0.2, 0.4])
    clock.sleeps.clear()
    with pytest.raises(UserError, match="waited 0s"):  # the caller's wait wins over the variable
        open_catalog(locked_db, lock_wait=0)
    assert clock.sleeps == []
    monkeypatch.delenv("BLIP3_LOCK_WAIT")
    with pytest.raises(UserError, match="waited 10s"):
        Catalog(locked_db)
    assert sum(clock.sleeps) == pytest.approx(10.55)


def test_a_lock_released_during_the_wait_is_taken(tmp_path, monkeypatch):
    db = tmp_path / "c.duckdb"
    Catalog(db).close()
    holder = hold_lock(db)
    clock = FakeClock(on_sleep=lambda n: release(holder) if n == 3 else None)
    monkeypatch.setattr(catalog_module, "time", clock)
    try:
        con = open_catalog(db, lock_wait=60)
    finally:
        if holder.poll() is None:
            release(holder)
    try:
        assert con.execute("SELECT count(*) FROM sources").fetchone() == (0,)
    finally:
        con.close()
    assert len(clock.sleeps) == 3


def test_the_datagen_driver_waits_half_a_second_then_keeps_its_batch(locked_db, tmp_path, clock, monkeypatch):
    monkeypatch.setenv("BLIP3_LOCK_WAIT", "3600")  # a command's wait: the driver does not use it
    write_caption_shard(tmp_path / "src", 0, 2)
    reg = BatchRegistrar(locked_db, tmp_path / "src", batch=1)
    reg.add(0)
    assert clock.sleeps == pytest.approx([0.05, 0.1, 0.2, 0.4])
    assert reg.pending == [0] and reg.batches == 0


def test_the_driver_registers_64_shards_a_batch_by_default(tmp_path):
    """The shards need not exist for the count: a full batch opens the catalog, an empty flush does not."""
    db = tmp_path / "c.duckdb"
    reg = BatchRegistrar(db, tmp_path / "out")
    reg.flush()
    assert not db.exists() and reg.batches == 0
    for i in range(63):
        reg.add(i)
    assert not db.exists() and len(reg.pending) == 63
    reg.add(63)
    assert db.exists() and reg.batches == 1 and reg.pending == []


def test_the_driver_trusts_its_writers_checksums_and_flags_a_rewritten_shard(output_dir, tmp_path, monkeypatch):
    """The driver registers shards its workers just wrote: no tar is read again, and a shard
    catalogued before with another checksum is flagged, its rows kept (`catalog add --refresh`
    replaces them)."""
    from blip3.core.storage import Location

    hashed: list[str] = []
    monkeypatch.setattr(Location, "sha256", lambda self, name="": hashed.append(name))
    db = tmp_path / "c.duckdb"
    reg = BatchRegistrar(db, output_dir, batch=2)
    reg.add(0)
    reg.add(1)
    write_caption_shard(output_dir, 1, 2, prefix="new")
    reg.add(1)
    reg.flush()
    assert hashed == [] and reg.batches == 2
    with Catalog(db) as cat:
        assert [s[1] for s in _statuses(cat)] == ["ok", "changed"]
        keys = [r[0] for r in cat.con.execute(
            "SELECT key FROM samples WHERE shard LIKE '%00001.tar' ORDER BY key").fetchall()]
    assert len(keys) == 6 and not any(k.startswith("new") for k in keys)


# -- opening ---------------------------------------------------------------------------------------
def test_db_path_is_the_argument_then_the_variable_then_the_default(tmp_path, monkeypatch):
    monkeypatch.delenv("BLIP3_DB", raising=False)
    assert resolve_db() == Path("catalog.duckdb")
    monkeypatch.setenv("BLIP3_DB", str(tmp_path / "env.duckdb"))
    assert resolve_db() == tmp_path / "env.duckdb"
    assert resolve_db(tmp_path / "flag.duckdb") == tmp_path / "flag.duckdb"


def test_the_catalog_folder_is_made_and_a_file_in_the_way_is_one_line(tmp_path):
    with Catalog(tmp_path / "a" / "b" / "c.duckdb") as cat:
        assert cat.source_names() == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot create the catalog's folder") as e:
        Catalog(tmp_path / "file" / "sub" / "c.duckdb")
    assert "\n" not in str(e.value)


def test_a_catalog_without_the_sample_checksum_column_gets_it(output_dir, tmp_path):
    db = tmp_path / "old.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE samples (source VARCHAR NOT NULL, shard VARCHAR NOT NULL, key VARCHAR, uid VARCHAR, "
                "url VARCHAR, status VARCHAR, error_message VARCHAR, width INTEGER, height INTEGER, "
                "original_width INTEGER, original_height INTEGER, image_bytes BIGINT, caption_length INTEGER, "
                "n_captions INTEGER, n_ocr INTEGER, n_objects INTEGER, mean_confidence FLOAT, "
                "has_source_caption BOOLEAN)")
    con.close()
    with Catalog(db) as cat:
        r = cat.add_output(output_dir)
        cols = [c[0] for c in cat.con.execute("DESCRIBE samples").fetchall()]
    assert (r.added, r.rows, r.failed) == (2, 13, []) and cols.count("sha256") == 1


# -- sources ---------------------------------------------------------------------------------------
@pytest.fixture
def output_dir(tmp_path):
    out = tmp_path / "ocr-en"
    write_caption_shard(out, 0, 6, n_failed=1)
    write_caption_shard(out, 1, 4, n_failed=2)
    return out


def test_a_source_keeps_its_kind_and_its_meta_until_given_new(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Catalog(tmp_path / "c.duckdb") as cat:
        with pytest.raises(UserError, match="unknown source kind 'images'") as e:
            cat.upsert_source("a", "images", "x")
        assert e.value.field == "kind"
        cat.upsert_source("a", "sft", "rel/dir", meta={"tokenizer": "t1"})
        cat.upsert_source("s3src", "caption", "s3://bucket/shards")
        with pytest.raises(UserError, match="source 'a' is already registered with kind 'sft'") as e:
            cat.upsert_source("a", "caption", "rel/dir")
        assert e.value.field == "kind"
        cat.upsert_source("a", "sft", "moved")  # no meta: the old one stays
        a = cat.source("a")
        assert (a.kind, a.path, a.meta) == ("sft", str(tmp_path / "moved"), {"tokenizer": "t1"})
        cat.upsert_source("a", "sft", "moved", meta={"tokenizer": "t2"})
        assert cat.source("a").meta == {"tokenizer": "t2"}
        cat.set_source_meta("a", {"x": 1})
        assert cat.source("a").meta == {"x": 1}
        assert cat.source("s3src").path == "s3://bucket/shards"
        assert cat.source("nope") is None
        assert cat.source_names() == ["a", "s3src"]


def test_only_a_source_without_shards_can_be_dropped(output_dir, tmp_path):
    with Catalog(tmp_path / "c.duckdb") as cat:
        cat.add_output(output_dir)
        cat.upsert_source("empty", "caption", tmp_path)
        with pytest.raises(ValueError, match="has shards"):
            cat.drop_source("ocr-en")
        cat.drop_source("empty")
        assert cat.source_names() == ["ocr-en"]


def test_shard_queries_by_source_tokens_and_status(output_dir, tmp_path):
    with Catalog(tmp_path / "c.duckdb") as cat:
        cat.add_output(output_dir)
        tar0, tar1 = (str(shard_paths(output_dir, i)[0].resolve()) for i in (0, 1))
        assert cat.shard_sha256(tar0) == file_sha256(tar0)
        assert cat.shard_sha256(str(tmp_path / "none.tar")) is None
        assert cat.shard_owner([tar1, tar0], other_than="ocr-en") is None
        assert cat.shard_owner([tar1, tar0], other_than="other") == (tar0, "ocr-en")
        assert [s.path for s in cat.source_shards("ocr-en")] == [tar0, tar1]
        assert cat.source_shards("ocr-en", counted_only=True) == []
        cat.set_shard_tokens({tar0: 70, tar1: 40})
        cat.con.execute("UPDATE shards SET status = 'changed' WHERE path = ?", [tar1])
        assert [(s.path, s.n_tokens, s.n_success, s.status) for s in cat.source_shards("ocr-en", ok_only=True)] == [
            (tar0, 70, 6, "ok")]
        assert len(cat.source_shards("ocr-en", counted_only=True)) == 2
        cat.refresh_source_counts("ocr-en")
        s = cat.source("ocr-en")
        assert (s.n_shards, s.n_samples, s.n_tokens) == (1, 6, 70)  # the changed shard is not counted


# -- adding, skipping, flagging -----------------------------------------------------------------------
def _statuses(cat: Catalog) -> list[tuple]:
    return cat.con.execute("SELECT idx, status, sha256 FROM shards ORDER BY idx").fetchall()


def test_a_shard_rewritten_since_is_flagged_and_replaced_only_on_refresh(output_dir, tmp_path):
    with Catalog(tmp_path / "c.duckdb") as cat:
        cat.add_output(output_dir)
        write_caption_shard(output_dir, 1, 2, prefix="new")  # a new tar with its own stats
        r = cat.add_output(output_dir)
        assert (r.added, r.skipped, r.changed) == (0, 1, 1)
        assert [s[1] for s in _statuses(cat)] == ["ok", "changed"]
        assert cat.con.execute("SELECT count(*) FROM samples WHERE key LIKE 'new%'").fetchone() == (0,)
        r = cat.add_output(output_dir, refresh=True)
        assert (r.added, r.skipped, r.changed, r.rows) == (1, 1, 0, 2)
        assert [s[1] for s in _statuses(cat)] == ["ok", "ok"]
        assert cat.con.execute("SELECT count(*) FROM samples WHERE shard LIKE '%00001.tar'").fetchone() == (2,)


def test_a_flagged_shard_stays_flagged_until_a_re_hash_finds_it_whole(output_dir, tmp_path):
    tar, _, _ = shard_paths(output_dir, 1)
    good = tar.read_bytes()
    with Catalog(tmp_path / "c.duckdb") as cat:
        cat.add_output(output_dir)
        tar.write_bytes(good[:600] + bytes([good[600] ^ 0xFF]) + good[601:])
        assert cat.add_output(output_dir, verify=True).changed == 1
        tar.write_bytes(good)  # restored
        r = cat.add_output(output_dir)  # same size: no re-hash, the flag stays
        assert (r.skipped, r.changed) == (1, 1) and _statuses(cat)[1][1] == "changed"
        r = cat.add_output(output_dir, verify=True)
        assert (r.skipped, r.changed) == (2, 0) and _statuses(cat)[1][1] == "ok"


def test_a_new_shard_whose_tar_does_not_match_its_stats_is_recorded_as_changed(output_dir, tmp_path):
    tar, _, _ = shard_paths(output_dir, 1)
    with open(tar, "ab") as f:
        f.write(b"\0" * 512)
    with Catalog(tmp_path / "c.duckdb") as cat:
        r = cat.add_output(output_dir)
        assert (r.added, r.changed, r.rows) == (1, 1, 7)
        assert _statuses(cat)[1] == (1, "changed", file_sha256(tar))  # the sha256 of what is on disk
        assert cat.con.execute("SELECT count(*) FROM samples WHERE shard = ?", [str(tar.resolve())]).fetchone() == (0,)
        assert cat.source("ocr-en").n_shards == 1


def test_a_failed_shard_reason_is_cut_at_300_characters(tmp_path):
    out = tmp_path / ("d" * 200) / ("e" * 200)
    write_caption_shard(out, 0, 2)
    shard_paths(out, 0)[1].write_bytes(b"not parquet")
    with Catalog(tmp_path / "c.duckdb") as cat:
        r = cat.add_output(out)
    assert r.added == 0 and len(r.failed) == 1
    path, reason = r.failed[0]
    assert path == str(shard_paths(out, 0)[0].resolve()) and len(reason) == 300 and "\n" not in reason


def test_a_shard_that_cannot_be_read_is_reported_and_the_rest_registered(tmp_path):
    out = tmp_path / ("d" * 200) / ("e" * 200)
    for i in range(3):
        write_caption_shard(out, i, 2)
    tar0, tar1 = (shard_paths(out, i)[0] for i in (0, 1))
    tar0.unlink()
    tar0.mkdir()  # a folder where the tar should be: not a tar
    tar1.unlink()
    with Catalog(tmp_path / "c.duckdb") as cat:
        r = cat.add_output(out)
        assert cat.con.execute("SELECT idx FROM shards").fetchall() == [(2,)]
    assert r.added == 1 and [p for p, _ in r.failed] == [str(tar0.resolve()), str(tar1.resolve())]
    assert [why for _, why in r.failed] == ["stats file present but tar missing"] * 2


def test_tars_without_stats_are_counted_and_the_first_named(tmp_path):
    for name in ("00001.tar", "00000.tar"):
        (tmp_path / name).write_bytes(b"")
    with Catalog(tmp_path / "c.duckdb") as cat, pytest.raises(UserError) as e:
        cat.add_output(tmp_path)
    assert str(e.value).endswith(f"; 2 tar(s) without a readable stats file, first: {tmp_path.resolve() / '00000.tar'}")


def test_the_summary_says_what_was_and_was_not_registered():
    ok = AddResult(source="s", added=2, skipped=1, rows=9)
    assert ok.summary() == "s: 2 shard(s) added (9 rows), 1 already catalogued"
    assert ok.check() is ok
    bad = AddResult(source="s", added=1, changed=2, rows=3, failed=[("/a.tar", "bad parquet"), ("/b.tar", "x")])
    line = "s: 1 shard(s) added (3 rows), 0 already catalogued, 2 changed on disk (flagged); " \
           "2 shard(s) NOT registered, first: /a.tar: bad parquet"
    assert bad.summary() == line
    with pytest.raises(UserError) as e:
        bad.check()
    assert str(e.value) == f"{line}; fix it and run `blip3 catalog add` on the folder again"


# -- mixtures, runs, evals ---------------------------------------------------------------------------
def _manifest(name: str, path: str | None, n_shards: int) -> Manifest:
    shards = [ShardRef(f"/s/{i}.tar", "0" * 64, 10, 5, 50) for i in range(n_shards)]
    src = ManifestSource("sft-a", "sft", 1.0, shards, samples=5 * n_shards, tokens=50 * n_shards, epochs=2.0,
                         target_samples=10 * n_shards, target_tokens=100 * n_shards)
    return Manifest(name, 7, {"samples": 10 * n_shards, "tokens": None}, "samples", [src], tokenizer="hf:tiny",
                    created_at="2026-01-02T03:04:05+00:00", path=path)


def test_a_mixture_is_recorded_with_its_manifest_path_and_replaced_whole(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Catalog(tmp_path / "c.duckdb") as cat:
        cat.record_mixture(_manifest("m", "m.yaml", 3), {"name": "m"})
        cat.record_mixture(_manifest("m", "m.yaml", 2), {"name": "m", "again": True})
        cat.record_mixture(_manifest("unsaved", None, 1), {})
        rows = cat.con.execute("SELECT name, manifest_path, seed, target_samples, spec FROM mixtures ORDER BY name"
                               ).fetchall()
        srcs = cat.con.execute("SELECT mixture, source, n_shards, target_samples, tokenizer FROM mixture_sources "
                               "ORDER BY mixture").fetchall()
    assert [(n, p, s, t, json.loads(j)) for n, p, s, t, j in rows] == [
        ("m", str(tmp_path / "m.yaml"), 7, 20, {"name": "m", "again": True}), ("unsaved", None, 7, 10, {})]
    assert srcs == [("m", "sft-a", 2, 20, "hf:tiny"), ("unsaved", "sft-a", 1, 10, "hf:tiny")]


def test_runs_are_replaced_by_id_and_a_checkpoint_maps_to_its_latest_run(tmp_path, monkeypatch):
    from datetime import datetime, timezone

    monkeypatch.chdir(tmp_path)
    ckpt = str(tmp_path / "ckpt")
    with Catalog(tmp_path / "c.duckdb") as cat:
        with pytest.raises(ValueError, match="run_id"):
            cat.record_run(stage="sft")
        cat.record_run(run_id="old", checkpoint=ckpt, finished_at=datetime(2026, 1, 1, tzinfo=timezone.utc))
        cat.record_run(run_id="new", checkpoint=ckpt, finished_at=datetime(2026, 1, 2, tzinfo=timezone.utc))
        cat.record_run(run_id="crashed", checkpoint=ckpt, finished_at=None)
        cat.record_run(run_id="new", checkpoint=ckpt, finished_at=datetime(2026, 1, 3, tzinfo=timezone.utc), steps=5)
        assert cat.con.execute("SELECT run_id, steps FROM runs WHERE run_id = 'new'").fetchall() == [("new", 5)]
        assert cat.run_for_checkpoint("ckpt") == "new"  # a relative path, resolved
        assert cat.run_for_checkpoint(tmp_path / "other") is None


def test_an_eval_replaces_its_own_rows_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Catalog(tmp_path / "c.duckdb") as cat:
        cat.record_eval(checkpoint="ck", task="vqa", shots=0, metrics={"acc": 0.5, "f1": 0.4}, n=10)
        cat.record_eval(checkpoint="ck", task="vqa", shots=4, metrics={"acc": 0.6}, n=10, predictions_path="p.parquet")
        cat.record_eval(checkpoint="ck", task="vqa", shots=0, metrics={"acc": 0.7}, n=12, run_id="r1")
        rows = cat.con.execute("SELECT run_id, checkpoint, shots, metric, value, n, predictions_path FROM evals "
                               "ORDER BY shots").fetchall()
    ck = str(tmp_path / "ck")
    assert rows == [("r1", ck, 0, "acc", 0.7, 12, None), (None, ck, 4, "acc", 0.6, 10, str(tmp_path / "p.parquet"))]
