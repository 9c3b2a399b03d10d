import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from blip3.core.catalog import Catalog, transaction
from blip3.core.errors import UserError
from blip3.core.shard_folder import ShardFolder
from blip3.core.shards import shard_paths
from blip3.core.sql import check_read_only, run_query
from tests.core_fixtures import write_caption_shard

REPO = Path(__file__).resolve().parents[1]


def blip3(*args: str, env_db: Path | None = None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, BLIP3_NO_PROGRESS="1")
    if env_db is not None:
        env["BLIP3_DB"] = str(env_db)
    return subprocess.run([sys.executable, "-m", "blip3.cli", *args], capture_output=True, text=True, env=env, cwd=REPO)


@pytest.fixture
def output_dir(tmp_path):
    out = tmp_path / "ocr-en"
    write_caption_shard(out, 0, 6, n_failed=1)
    write_caption_shard(out, 1, 4, n_failed=2)
    return out


def counts(db: Path) -> tuple[int, int, int]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return tuple(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("sources", "shards", "samples"))
    finally:
        con.close()


def test_add_twice_is_idempotent(output_dir, tmp_path):
    db = tmp_path / "c.duckdb"
    with Catalog(db) as cat:
        r1 = cat.add_output(output_dir)
    assert (r1.added, r1.rows, r1.source) == (2, 13, "ocr-en")
    first = counts(db)
    assert first == (1, 2, 13)
    with Catalog(db) as cat:
        r2 = cat.add_output(output_dir)
    assert (r2.added, r2.skipped, r2.changed) == (0, 2, 0)
    assert counts(db) == first
    rows = run_query("SELECT source, shards, samples, ok, failed FROM v_source_summary", db).to_pylist()
    assert rows == [{"source": "ocr-en", "shards": 2, "samples": 13, "ok": 10, "failed": 3}]
    n = run_query("SELECT n_samples FROM sources", db).to_pylist()
    assert n == [{"n_samples": 10}]


def test_changed_shard_is_flagged(output_dir, tmp_path):
    db = tmp_path / "c.duckdb"
    with Catalog(db) as cat:
        cat.add_output(output_dir)
    tar, _, _ = shard_paths(output_dir, 1)
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF
    tar.write_bytes(bytes(data))
    with Catalog(db) as cat:  # same size: the writer's sha256 is trusted (hash once) ...
        r = cat.add_output(output_dir)
        assert (r.added, r.skipped, r.changed) == (0, 2, 0)
        r = cat.add_output(output_dir, verify=True)  # ... until the user asks for a re-read
    assert (r.added, r.skipped, r.changed) == (0, 1, 1)
    status = run_query("SELECT idx, status FROM shards ORDER BY idx", db).to_pylist()
    assert status == [{"idx": 0, "status": "ok"}, {"idx": 1, "status": "changed"}]
    tar0, _, _ = shard_paths(output_dir, 0)
    with open(tar0, "ab") as f:  # another size is caught without --verify
        f.write(b"\0" * 512)
    with Catalog(db) as cat:
        r = cat.add_output(output_dir)
    assert r.changed == 2 and run_query("SELECT status FROM shards WHERE idx = 0", db).to_pylist() == [
        {"status": "changed"}]


def test_reregistering_a_shard_replaces_its_rows_through_the_shard_index(output_dir, tmp_path):
    db = tmp_path / "c.duckdb"
    with Catalog(db) as cat:
        cat.add_output(output_dir)
        n = cat.con.execute("SELECT count(*) FROM samples").fetchone()[0]
        folder = ShardFolder(output_dir)
        with transaction(cat.con):
            cat._replace_shards(folder, folder.finished(["00000"]), "ocr-en")  # again: replaced, not doubled
        assert cat.con.execute("SELECT count(*) FROM samples").fetchone()[0] == n
        assert cat.con.execute("SELECT count(*) FROM duckdb_indexes() WHERE index_name = 'samples_by_shard'"
                               ).fetchone()[0] == 1


def test_catalog_add_cli_and_env_var(output_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one table row per source, no wrapping
    db = tmp_path / "env.duckdb"
    r = blip3("catalog", "add", str(output_dir), "--source", "mine", env_db=db)
    assert r.returncode == 0, r.stderr
    assert "mine: 2 shard(s) added (13 rows), 0 already catalogued" in " ".join(r.stderr.split())
    r = blip3("catalog", "stats", env_db=db)
    assert r.returncode == 0
    (row,) = [line for line in r.stdout.splitlines() if "mine" in line]
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells[:6] == ["mine", "caption", "2", "13", "10", "3"]  # source kind shards samples ok failed
    r = blip3("sql", "SELECT count(*) AS n FROM samples", "--format", "json", "--db", str(db))
    assert r.returncode == 0
    assert json.loads(r.stdout.strip()) == {"n": 13}


@pytest.mark.parametrize(
    "stmt",
    [
        "DROP TABLE samples",
        "INSERT INTO sources (name, kind, path) VALUES ('x', 'caption', '/')",
        "COPY (SELECT 1) TO 'leak.csv'",
        "ATTACH 'other.duckdb' AS o",
        "SELECT 1; DELETE FROM samples",
        "CREATE TABLE t AS SELECT 1",
        "EXPORT DATABASE 'dump'",
        "INSTALL httpfs",
        "SET threads = 1",
    ],
)
def test_sql_refuses_writes(stmt, output_dir, tmp_path):
    db = tmp_path / "c.duckdb"
    with Catalog(db) as cat:
        cat.add_output(output_dir)
    before = counts(db)
    with pytest.raises(UserError, match="refused"):
        check_read_only(stmt)
    r = blip3("sql", stmt, "--db", str(db))
    assert r.returncode == 2
    assert "refused" in r.stderr and "Traceback" not in r.stderr
    assert counts(db) == before
    assert not (REPO / "leak.csv").exists() and not (tmp_path / "leak.csv").exists()


def test_sql_error_is_one_clear_line(output_dir, tmp_path):
    db = tmp_path / "c.duckdb"
    with Catalog(db) as cat:
        cat.add_output(output_dir)
    r = blip3("sql", "SELECT nope FROM samples", "--db", str(db))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) <= 2 and "SQL error" in r.stderr and "nope" in r.stderr
    r = blip3("sql", "SELEC 1", "--db", str(db))
    assert r.returncode == 2 and "SQL error" in r.stderr and "Traceback" not in r.stderr


def test_sql_output_formats(output_dir, tmp_path):
    db = tmp_path / "c.duckdb"
    with Catalog(db) as cat:
        cat.add_output(output_dir)
    q = "SELECT key, status FROM samples ORDER BY key"
    csv_out = tmp_path / "r.csv"
    assert blip3("sql", q, "--db", str(db), "--format", "csv", "--out", str(csv_out)).returncode == 0
    assert csv_out.read_text().splitlines()[0] == '"key","status"'
    pq_out = tmp_path / "r.parquet"
    assert blip3("sql", q, "--db", str(db), "--format", "parquet", "--out", str(pq_out)).returncode == 0
    import pyarrow.parquet as pq

    assert pq.read_table(pq_out).num_rows == 13
    r = blip3("sql", q, "--db", str(db), "--format", "parquet")
    assert r.returncode == 2 and "--out" in r.stderr


def test_missing_catalog_is_a_clear_error(tmp_path):
    r = blip3("sql", "SELECT 1", "--db", str(tmp_path / "none.duckdb"))
    assert r.returncode == 2 and "catalog not found" in r.stderr


def test_add_rejects_folder_without_shards(tmp_path):
    with Catalog(tmp_path / "c.duckdb") as cat, pytest.raises(UserError, match="no finished shards"):
        cat.add_output(tmp_path)


def test_add_with_a_corrupt_sidecar_registers_the_good_shards_and_exits_non_zero(tmp_path):
    out = tmp_path / "src"
    write_caption_shard(out, 0, 3)
    write_caption_shard(out, 1, 4)
    write_caption_shard(out, 2, 5)
    _, parquet, _ = shard_paths(out, 1)
    parquet.write_bytes(b"PAR1 this is not a parquet file PAR1")
    (out / "00007.tar").write_bytes(b"")  # a tar with no stats file: a killed or foreign writer
    db = tmp_path / "c.duckdb"
    r = blip3("catalog", "add", str(out), "--db", str(db))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    text = " ".join(r.stderr.split())
    assert "2 shard(s) added (8 rows)" in text and "2 shard(s) NOT registered" in text
    assert f"not registered: {(out / '00001.tar').resolve()}:" in text
    assert f"not registered: {(out / '00007.tar').resolve()}: no stats file" in text
    assert run_query("SELECT idx FROM shards ORDER BY idx", db).to_pylist() == [{"idx": 0}, {"idx": 2}]
    assert counts(db) == (1, 2, 8)  # the bad shard left no partial rows
    parquet.unlink()
    write_caption_shard(out, 1, 4)  # repaired: a second add registers it
    (out / "00007.tar").unlink()
    with Catalog(db) as cat:
        r2 = cat.add_output(out)
    assert (r2.added, r2.skipped, r2.failed) == (1, 2, [])


def test_add_counts_a_folder_of_stats_less_tars_in_its_error(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"")
    with Catalog(tmp_path / "c.duckdb") as cat, pytest.raises(UserError, match=r"1 tar\(s\) without a readable stats"):
        cat.add_output(tmp_path)


def test_catalog_from_before_the_img2dataset_names_is_migrated(output_dir, tmp_path):
    db = tmp_path / "old.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE samples (source VARCHAR NOT NULL, shard VARCHAR NOT NULL, key VARCHAR, uid VARCHAR, "
                "url VARCHAR, status VARCHAR, error VARCHAR, width INTEGER, height INTEGER, orig_width INTEGER, "
                "orig_height INTEGER, image_bytes BIGINT, caption_length INTEGER, n_captions INTEGER, n_ocr INTEGER, "
                "n_objects INTEGER, mean_confidence FLOAT, has_source_caption BOOLEAN)")
    con.execute("CREATE INDEX samples_by_shard ON samples (shard)")
    con.execute("INSERT INTO samples (source, shard, key, status, error) VALUES ('old', 's', 'k', 'failed', 'decode: x')")
    con.close()
    with Catalog(db) as cat:
        cat.add_output(output_dir, source="new")
        rows = cat.con.execute("SELECT source, error_message FROM samples WHERE status = 'failed' ORDER BY source").fetchall()
    assert rows[-1] == ("old", "decode: x") and any(src == "new" for src, _ in rows)


# -- hostile SQL: DuckDB's own settings refuse it, whatever the text looks like ----------------------
HOSTILE_SQL = [
    # (statement, a path relative to the test folder that must not appear)
    ("WITH x AS (COPY (SELECT * FROM samples) TO '{d}/cte.csv') SELECT 1", "cte.csv"),
    ("EXPLAIN ANALYSE COPY (SELECT 1) TO '{d}/analyse.csv'", "analyse.csv"),
    ("EXPLAIN ANALYZE COPY (SELECT 1) TO '{d}/analyze.csv'", "analyze.csv"),
    ("WITH x AS (COPY (SELECT 'garbage') TO '{d}/other.duckdb') SELECT 1", "other.duckdb"),
    ("COPY (SELECT 1) TO '{d}/copy.parquet' (FORMAT parquet)", "copy.parquet"),
    ("EXPORT DATABASE '{d}/dump'", "dump"),
    ("ATTACH '{d}/attached.duckdb' AS o", "attached.duckdb"),
    ("WITH x AS (DELETE FROM samples RETURNING *) SELECT count(*) FROM x", None),
    ("SELECT * FROM read_text('/etc/shadow')", None),
    ("SELECT * FROM read_text('/etc/hostname')", None),
    ("SELECT * FROM read_csv('/etc/passwd')", None),
    ("SELECT * FROM read_csv_auto('/etc/passwd')", None),
    ("SELECT * FROM read_json_auto('/etc/passwd')", None),
    ("SELECT * FROM read_blob('/etc/hostname')", None),
    ("SELECT * FROM sniff_csv('/etc/passwd')", None),
    ("SELECT * FROM parquet_metadata('{d}/src/00000.parquet')", None),
    ("SELECT * FROM read_parquet('{d}/src/00000.parquet')", None),
    ("SELECT * FROM glob('/root/**')", None),
    ("SELECT * FROM glob('{d}/*')", None),
    ("SELECT * FROM read_csv('http://127.0.0.1:9/x.csv')", None),
    ("SELECT * FROM read_parquet('s3://bucket/x.parquet')", None),
    ("SELECT * FROM duckdb_extensions()", None),
    ("INSTALL httpfs", None),
    ("LOAD httpfs", None),
    ("SET enable_external_access = true", None),
    ("RESET threads", None),
    ("PRAGMA enable_profiling", None),
    ("CALL pragma_version()", None),
    ("SELECT * FROM query('SELECT * FROM read_text(''/etc/hostname'')')", None),
    ("CREATE SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')", None),
    ("DROP TABLE samples", None),
    ("CHECKPOINT", None),
]


@pytest.fixture(scope="module")
def hostile_home(tmp_path_factory):
    """One catalog for the table below (every statement is refused, so it never changes)."""
    d = tmp_path_factory.mktemp("hostile")
    (d / "home").mkdir()
    write_caption_shard(d / "src", 0, 3)
    with Catalog(d / "c.duckdb") as cat:
        cat.add_output(d / "src")
    return d


@pytest.mark.parametrize("stmt, must_not_exist", HOSTILE_SQL, ids=[s for s, _ in HOSTILE_SQL])
def test_hostile_sql_is_refused_by_duckdb_settings(stmt, must_not_exist, hostile_home, monkeypatch):
    d, db = hostile_home, hostile_home / "c.duckdb"
    monkeypatch.setenv("HOME", str(d / "home"))  # where DuckDB would put ~/.duckdb/extensions
    with pytest.raises(UserError, match="refused") as e:
        run_query(stmt.format(d=d), db)
    assert "\n" not in str(e.value)
    if must_not_exist:
        assert not (d / must_not_exist).exists()
    assert counts(db) == (1, 1, 3)
    assert not (d / "home" / ".duckdb").exists()


def test_queries_still_read_the_catalog_with_its_views(output_dir, tmp_path):
    db = tmp_path / "c.duckdb"
    with Catalog(db) as cat:
        cat.add_output(output_dir)
    assert run_query("WITH s AS (SELECT * FROM samples) SELECT count(*) AS n FROM s", db).to_pylist() == [{"n": 13}]
    plan = run_query("EXPLAIN ANALYZE SELECT count(*) FROM samples", db)  # only reads: allowed
    assert plan.num_rows >= 1
    assert run_query("SELECT current_setting('enable_external_access') AS e", db).to_pylist() == [{"e": False}]


def test_hostile_sql_through_the_cli_writes_nothing(output_dir, tmp_path):
    db = tmp_path / "c.duckdb"
    with Catalog(db) as cat:
        cat.add_output(output_dir)
    target = tmp_path / "victim.duckdb"
    with Catalog(target):
        pass
    size = target.stat().st_size
    r = blip3("sql", f"WITH x AS (COPY (SELECT 'garbage') TO '{target}' (FORMAT csv)) SELECT 1", "--db", str(db))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "refused" in r.stderr
    assert target.stat().st_size == size and counts(target) == (0, 0, 0)


def test_db_that_is_not_duckdb_is_one_line(tmp_path):
    bad = tmp_path / "notes.duckdb"
    bad.write_text("just some text, not a database\n")
    for args in (["sql", "SELECT 1"], ["catalog", "stats"]):
        r = blip3(*args, "--db", str(bad))
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert "not a DuckDB catalog file" in " ".join(r.stderr.split())
    with pytest.raises(UserError, match="not a DuckDB catalog file"):
        Catalog(bad)
    with pytest.raises(UserError, match="not a DuckDB catalog file"):
        run_query("SELECT 1", tmp_path)  # a folder


def test_db_that_is_a_csv_json_or_parquet_file_is_refused_and_left_alone(output_dir, tmp_path):
    """DuckDB opens an existing CSV/JSON/Parquet file given as a database in memory: `catalog add`
    would report success and keep nothing. Anything without DuckDB's header is refused."""
    files = {"rows.csv": b"a,b\n1,2\n", "rows.json": b'{"a": 1}\n', "empty.duckdb": b""}
    duckdb.sql(f"COPY (SELECT 1 AS a) TO '{tmp_path / 'rows.parquet'}' (FORMAT parquet)")
    for name, body in files.items():
        (tmp_path / name).write_bytes(body)
    for name in [*files, "rows.parquet"]:
        bad = tmp_path / name
        before = bad.read_bytes()
        with pytest.raises(UserError, match="not a DuckDB catalog file"):
            Catalog(bad)
        with pytest.raises(UserError, match="not a DuckDB catalog file"):
            run_query("SELECT 1", bad)
        assert bad.read_bytes() == before
    for args in (["catalog", "add", str(output_dir)], ["sql", "SELECT count(*) FROM samples"]):
        r = blip3(*args, "--db", str(tmp_path / "rows.csv"))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "not a DuckDB catalog file" in " ".join(r.stderr.split())
    fresh = tmp_path / "new.csv"  # a path that does not exist yet is a new catalog, whatever its name
    with Catalog(fresh) as cat:
        cat.add_output(output_dir)
    assert counts(fresh) == (1, 2, 13)


def test_catalog_locked_by_another_process_waits_then_says_so(output_dir, tmp_path):
    import os

    db = tmp_path / "c.duckdb"
    with Catalog(db) as cat:
        cat.add_output(output_dir)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, sys; c = duckdb.connect({str(db)!r}); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        env = dict(os.environ, BLIP3_NO_PROGRESS="1", BLIP3_LOCK_WAIT="0.3")
        for args in (["sql", "SELECT 1"], ["catalog", "add", str(output_dir)]):
            r = subprocess.run([sys.executable, "-m", "blip3.cli", *args, "--db", str(db)],
                               capture_output=True, text=True, env=env, cwd=REPO)
            assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
            text = " ".join(r.stderr.split())
            assert "catalog is locked by another process" in text and f"PID {holder.pid}" in text
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert run_query("SELECT count(*) AS n FROM samples", db).to_pylist() == [{"n": 13}]  # free again
