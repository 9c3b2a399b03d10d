"""Every command that takes an output location writes there: an `s3://` output reaches the bucket
(a real S3-compatible server, moto's server mode on 127.0.0.1), never a local folder named `s3:`;
outputs that cannot hold a result are refused before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blip3.core.shards import SampleRow, ShardWriter
from blip3.core.storage import Location
from tests.core_fixtures import jpeg, write_caption_shard
from tests.test_catalog_s3 import _forget_filesystems_built_from_other_environments
from tests.test_storage_s3 import BUCKET, s3_server  # noqa: F401 - the fixture


def _env(options: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=options["endpoint_url"], AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION="us-east-1", BLIP3_NO_PROGRESS="1")
    return env


def _cli(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blip3.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def _ocr_shard(out: Path) -> None:
    with ShardWriter(out, 0, generator={"name": "ocr"}) as w:
        record = {"uid": "u-a", "captions": [{"text": "a"}], "metadata": {"entries": []}}
        w.add("a", {"jpg": jpeg(), "txt": "a", "json": record}, SampleRow("a"))


@pytest.mark.slow
def test_url_outputs_reach_the_store_and_nothing_lands_in_a_local_s3_folder(s3_server, tmp_path, monkeypatch):  # noqa: F811
    """sql --out, mix build -o, audit -o and export -o through the CLI (where `-o s3://...` used to
    become the local path `s3:/...`), and import-released and retemplate into the bucket."""
    from blip3.datagen.released import import_released
    from blip3.datagen.retemplate import retemplate
    from tests.test_datagen_released import _images

    env, root = _env(s3_server), f"s3://{BUCKET}/{tmp_path.name}"
    db = str(tmp_path / "c.duckdb")
    write_caption_shard(tmp_path / "caps", 0, 3)
    _ocr_shard(tmp_path / "ocr")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: m\nsources:\n  - {{name: caps, path: {tmp_path / 'caps'}, kind: caption, weight: 1}}\n")
    for args in (["mix", "build", str(spec), "-o", f"{root}/m.yaml", "--db", db],
                 ["sql", "SELECT 42 AS n", "--format", "csv", "--out", f"{root}/r.csv", "--db", db],
                 ["audit", str(tmp_path / "caps"), "-o", f"{root}/audit"],
                 ["export", "blip3-ocr", str(tmp_path / "ocr"), "-o", f"{root}/export"]):
        r = _cli(args, env, tmp_path)
        assert r.returncode == 0, (args, r.stderr[-2000:])
    store = Location(root, s3_server)
    assert store.read_bytes("r.csv") == b'"n"\n42\n'
    assert b"name: m" in store.read_bytes("m.yaml")
    assert store.child("audit").exists("index.html") and store.child("audit").exists("images/0000.jpg")
    assert pq.read_table(store.child("export").open("part-00000.parquet"))["uid"].to_pylist() == ["u-a"]

    for k, v in env.items():  # the library calls below reach the store the standard way
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    _forget_filesystems_built_from_other_environments()
    rows = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{"uid": "u1", "url": "http://x/1.jpg", "metadata": "{}",
                                          "captions": json.dumps([{"text": "hi", "granularity": 0}])}]), rows)
    r = import_released("blip3-ocr", rows, _images(tmp_path / "img", ["u1.jpg"]), f"{root}/released")
    assert r.samples == 1 and store.child("released").is_complete("00000")
    with ShardWriter(tmp_path / "g", 0, generator={"name": "grounding"}) as w:
        record = {"metadata": {"objects": [{"label": "dog", "bbox": [0.1, 0.1, 0.5, 0.5], "score": 0.9}]},
                  "source_caption": "a dog", "captions": []}
        w.add("k", {"jpg": jpeg(), "txt": "old", "json": record}, SampleRow("k", n_objects=1))
    retemplate(tmp_path / "g", f"{root}/re", register=False)
    assert store.child("re").is_complete("00000") and b"dog" in store.child("re").read_bytes("00000.tar")
    assert not (tmp_path / "s3:").exists() and not any(p.name.startswith("s3:") for p in tmp_path.iterdir())


@pytest.mark.parametrize("out, words", [
    ("memory://x/r.csv", "memory:// lives in one process"),
    ("https://example.org/r.csv", "read-only"),
    ("simplecache::memory://x", "chained URL"),
    ("file://rel/out.csv", "names the host 'rel'"),
])
def test_outputs_that_cannot_hold_a_result_are_one_line(out, words, tmp_path):
    r = _cli(["sql", "SELECT 1", "--format", "csv", "--out", out, "--db", str(tmp_path / "c.duckdb")],
             dict(os.environ, BLIP3_NO_PROGRESS="1"), tmp_path)
    assert r.returncode == 2 and words in " ".join(r.stderr.split()) and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["c.duckdb"])  # nothing written locally
    assert not Path("/rel").exists()


@pytest.mark.parametrize("args", [["source", "tiny", "-o", "s3://b/tiny"], ["mix", "sample", "m.yaml", "-o", "gs://b/s.jsonl"],
                                  ["source", "tiny", "-o", "file://rel/out"]])
def test_commands_that_write_local_files_refuse_urls_before_running(args, tmp_path):
    r = _cli(args, dict(os.environ, BLIP3_NO_PROGRESS="1"), tmp_path)
    line = " ".join(r.stderr.replace("│", " ").split())  # click's usage error, in rich's box
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is not supported for this output" in line or "names the host 'rel'" in line
    assert list(tmp_path.iterdir()) == [] and not Path("/rel").exists()
