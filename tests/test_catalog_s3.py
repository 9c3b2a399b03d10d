"""`catalog add` and `mix build` of shards on an object store: a real S3-compatible server (moto's
server mode on 127.0.0.1, tests.test_storage_s3's fixture) reached through s3fs. Never a mock."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from blip3.core.catalog import Catalog
from blip3.core.errors import UserError
from blip3.core.storage import Location as RemoteDir
from blip3.mixture.build import build_manifest
from blip3.mixture.manifest import load_manifest
from tests.core_fixtures import write_caption_shard
from tests.test_core_catalog import blip3 as cli
from tests.test_storage_s3 import BUCKET, s3_server  # noqa: F401 - the fixture

SAMPLE_COLUMNS = "key, uid, status, error_message, width, height, caption_length, n_ocr"


def _upload(local: Path, url: str, options: dict) -> RemoteDir:
    remote = RemoteDir(url, options)
    for p in sorted(local.iterdir()):
        remote.put(p, p.name)
    return remote


@pytest.fixture
def shards_on_s3(tmp_path, s3_server):  # noqa: F811
    """Three finished shards written locally, and the same files under a fresh prefix of the bucket."""
    local = tmp_path / "ocr-en"
    for i, (n, bad) in enumerate([(4, 1), (3, 0), (5, 2)]):
        write_caption_shard(local, i, n, n_failed=bad)
    url = f"s3://{BUCKET}/{tmp_path.name}/ocr-en"
    return local, _upload(local, url, s3_server)


def _rows(db: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_catalog_add_reads_sidecars_and_stats_from_the_store(shards_on_s3, s3_server, tmp_path, monkeypatch):  # noqa: F811
    """The rows are those of the same folder added locally, under the tars' URLs; no tar is read
    (the sha256 is trusted from the stats) unless `verify`, which re-hashes every one."""
    local, remote = shards_on_s3
    hashed: list[str] = []
    rehash = RemoteDir.sha256
    monkeypatch.setattr(RemoteDir, "sha256", lambda self, name="": hashed.append(name) or rehash(self, name))
    db_local, db_s3 = tmp_path / "local.duckdb", tmp_path / "s3.duckdb"
    with Catalog(db_local) as cat:
        cat.add_output(local)
    with Catalog(db_s3) as cat:
        r = cat.add_output(remote.url, storage_options=s3_server)
    assert (r.source, r.added, r.rows, r.failed, hashed) == ("ocr-en", 3, 15, [], [])
    query = f"SELECT {SAMPLE_COLUMNS} FROM samples ORDER BY key"
    assert _rows(db_s3, query) == _rows(db_local, query) and len(_rows(db_s3, query)) == 15
    assert _rows(db_s3, "SELECT path FROM shards ORDER BY path") == [(f"{remote.url}/0000{i}.tar",) for i in range(3)]
    assert _rows(db_s3, "SELECT path, n_shards, n_samples FROM sources") == [(remote.url, 3, 12)]
    assert _rows(db_s3, "SELECT DISTINCT shard FROM samples ORDER BY 1") == [(f"{remote.url}/0000{i}.tar",) for i in range(3)]
    with Catalog(db_s3) as cat:
        again = cat.add_output(remote.url, storage_options=s3_server, verify=True)
    assert (again.added, again.skipped) == (0, 3) and len(hashed) == 3
    assert _rows(db_s3, "SELECT count(*) FROM samples") == [(15,)]


def test_a_tar_changed_on_the_store_is_flagged_by_verify(shards_on_s3, s3_server, tmp_path):  # noqa: F811
    _, remote = shards_on_s3
    db = tmp_path / "c.duckdb"
    with Catalog(db) as cat:
        cat.add_output(remote.url, storage_options=s3_server)
    size = remote.size("00001.tar")
    remote.fs.pipe_file(remote.path("00001.tar"), bytes(size))  # same size, other bytes
    with Catalog(db) as cat:
        assert cat.add_output(remote.url, storage_options=s3_server).skipped == 3  # trusted: not read
        r = cat.add_output(remote.url, storage_options=s3_server, verify=True)
    assert (r.changed, r.skipped) == (1, 2)
    assert _rows(db, "SELECT path FROM shards WHERE status = 'changed'") == [(f"{remote.url}/00001.tar",)]
    remote.remove("00002.tar")
    with Catalog(db) as cat:
        r = cat.add_output(remote.url, storage_options=s3_server)
    assert [(p.rsplit("/", 1)[-1], why) for p, why in r.failed] == [("00002.tar", "stats file present but tar missing")]


def test_catalog_add_cli_on_the_store(shards_on_s3, s3_server, tmp_path):  # noqa: F811
    """Through the CLI with `--storage-options`; a prefix with nothing there is one line."""
    _, remote = shards_on_s3
    db = tmp_path / "c.duckdb"
    r = cli("catalog", "add", remote.url, "--source", "remote", "--storage-options", json.dumps(s3_server),
              "--db", str(db))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "remote: 3 shard(s) added (15 rows)" in " ".join(r.stderr.split())
    r = cli("catalog", "add", f"s3://{BUCKET}/nothing/here", "--storage-options", json.dumps(s3_server),
              "--db", str(db))
    assert r.returncode == 2 and "no such folder" in r.stderr and "Traceback" not in r.stderr


def test_mix_build_from_catalogued_shards_on_the_store(shards_on_s3, s3_server, tmp_path):  # noqa: F811
    """The manifest names the tars by URL, with the tokens the local build counts (read from the
    store); a tar deleted from the store is one error naming it."""
    local, remote = shards_on_s3
    spec = {"name": "m", "seed": 0, "sources": [{"name": "ocr-en", "weight": 1.0}]}
    dbs = {}
    for where, location, options in (("local", local, None), ("s3", remote.url, s3_server)):
        dbs[where] = tmp_path / f"{where}.duckdb"
        with Catalog(dbs[where]) as cat:
            cat.add_output(location, storage_options=options)
    built = {w: build_manifest(spec, db=db, out=tmp_path / f"{w}.yaml", storage_options=s3_server if w == "s3" else None)
             for w, db in dbs.items()}
    shards = built["s3"].sources[0].shards
    assert [s.path for s in shards] == [f"{remote.url}/0000{i}.tar" for i in range(3)]
    assert [(s.samples, s.tokens, s.sha256, s.bytes) for s in shards] == [
        (s.samples, s.tokens, s.sha256, s.bytes) for s in built["local"].sources[0].shards]
    assert built["s3"].target == built["local"].target and shards[0].tokens > 0
    reloaded = load_manifest(tmp_path / "s3.yaml", verify="none")
    assert [s.path for s in reloaded.sources[0].shards] == [s.path for s in shards]  # URLs kept as written
    remote.remove("00001.tar")
    with pytest.raises(UserError, match="00001.tar is missing"):
        build_manifest(spec, db=dbs["s3"], storage_options=s3_server)


def test_mix_build_cli_verify_rehashes_tars_on_the_store(shards_on_s3, s3_server, tmp_path):  # noqa: F811
    """`--verify sha256` re-reads the tars: one changed on the store (same size) is an error; the
    default trusts the recorded sha256 and builds."""
    _, remote = shards_on_s3
    db = tmp_path / "c.duckdb"
    with Catalog(db) as cat:
        cat.add_output(remote.url, storage_options=s3_server)
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: m\nsources:\n  - {name: ocr-en, weight: 1}\n")
    base = ["mix", "build", str(spec), "--db", str(db), "--storage-options", json.dumps(s3_server)]
    r = cli(*base, "-o", str(tmp_path / "a.yaml"))
    assert r.returncode == 0, r.stderr[-2000:]
    remote.fs.pipe_file(remote.path("00000.tar"), bytes(remote.size("00000.tar")))
    r = cli(*base, "-o", str(tmp_path / "b.yaml"), "--verify", "sha256")
    assert r.returncode == 2 and "changed on disk (sha256 differs" in " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr and not (tmp_path / "b.yaml").exists()


def test_unreadable_sidecars_on_the_store_fail_alone(shards_on_s3, s3_server, tmp_path):  # noqa: F811
    """A corrupt and a missing sidecar in one batch: the batch is redone shard by shard, and only
    those two are reported (the store's errors, not a traceback); the third is registered."""
    _, remote = shards_on_s3
    remote.fs.pipe_file(remote.path("00001.parquet"), b"not parquet")
    remote.remove("00002.parquet")
    with Catalog(tmp_path / "c.duckdb") as cat:
        r = cat.add_output(remote.url, storage_options=s3_server)
        assert cat.con.execute("SELECT DISTINCT shard FROM samples").fetchall() == [(f"{remote.url}/00000.tar",)]
    assert (r.added, r.rows) == (1, 5)
    assert [(p.rsplit("/", 1)[-1], "parquet" in why.lower()) for p, why in r.failed] == [("00001.tar", True),
                                                                                          ("00002.tar", True)]


def test_source_add_inline_sources_and_the_loader_on_the_store(shards_on_s3, s3_server, tmp_path, monkeypatch):  # noqa: F811
    """`source add NAME s3://...` (our shards, and foreign tars by a brace pattern), a spec naming
    `s3://` shards inline, and the trainer's loader reading those tars: the same counts, tokens and
    samples as the local copies give."""
    from blip3.mixture.loader import MixtureLoader
    from blip3.mixture.sources import add_source
    from blip3.mixture.tokens import TokenCounter
    from tests.test_mixture_catalog import _foreign_tar

    local, remote = shards_on_s3
    (tmp_path / "wds").mkdir()
    for i, n in enumerate((3, 2)):
        _foreign_tar(tmp_path / "wds" / f"{i:05d}.tar", n)
    wds = _upload(tmp_path / "wds", f"s3://{BUCKET}/{tmp_path.name}/wds", s3_server)
    got = {}
    for where, ours, theirs, options in (("local", local, tmp_path / "wds" / "{00000..00001}.tar", None),
                                         ("s3", remote.url, f"{wds.url}/{{00000..00001}}.tar", s3_server)):
        with Catalog(tmp_path / f"{where}.duckdb") as cat:
            a = add_source(cat, "ocr-en", ours, "caption", TokenCounter(), options)
            b = add_source(cat, "cc", theirs, "caption", TokenCounter(), options)
        got[where] = [(r.shards, r.samples, r.tokens) for r in (a, b)]
    assert got["s3"] == got["local"] == [(3, 12, got["local"][0][2]), (2, 5, got["local"][1][2])]

    spec = {"name": "m", "seed": 0, "sources": [{"name": "inline", "kind": "caption", "weight": 1.0,
                                                 "path": f"{remote.url}"}]}
    m = build_manifest(spec, storage_options=s3_server, record=False)
    assert [s.path for s in m.sources[0].shards] == [f"{remote.url}/0000{i}.tar" for i in range(3)]
    local_m = build_manifest({**spec, "sources": [{**spec["sources"][0], "path": str(local)}]}, record=False)
    for k, v in {"AWS_ENDPOINT_URL": s3_server["endpoint_url"], "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)  # the trainer reaches the store the standard way
    _forget_filesystems_built_from_other_environments()
    samples = MixtureLoader(m, shuffle_buffer=4).take(20)
    expected = MixtureLoader(local_m, shuffle_buffer=4).take(20)
    assert [(s["key"], s["txt"], s["images"]) for s in samples] == [(s["key"], s["txt"], s["images"]) for s in expected]


def _forget_filesystems_built_from_other_environments() -> None:
    """fsspec keeps one filesystem per set of arguments: one built from the environment of an
    earlier test (another server's endpoint) would be reused for ours."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
