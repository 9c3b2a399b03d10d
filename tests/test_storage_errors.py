"""Stores that are not object stores, or that cannot be reached: an HTTP folder (a real
`http.server` on 127.0.0.1) is catalogued like any other; a store without credentials or out of
reach is one line naming what to set, never a traceback."""

from __future__ import annotations

import os

import pytest

from blip3.core.catalog import Catalog
from blip3.core.errors import UserError
from blip3.demo.serve import serve_folder
from tests.core_fixtures import write_caption_shard
from tests.test_storage_s3 import BUCKET, _cli, _free_port, s3_server  # noqa: F401 - the fixture


@pytest.fixture
def http_folder(tmp_path):
    """A shard folder served by Python's own HTTP server (its listing is an HTML page of links)."""
    write_caption_shard(tmp_path / "site" / "out", 0, 3, n_failed=1)
    with serve_folder(tmp_path / "site") as url:
        yield url


def test_catalog_add_of_an_http_folder(http_folder, tmp_path):
    with Catalog(tmp_path / "c.duckdb") as cat:
        r = cat.add_output(f"{http_folder}/out")
        assert (r.added, r.rows, r.failed) == (1, 4, [])
        assert cat.con.execute("SELECT path FROM shards").fetchall() == [(f"{http_folder}/out/00000.tar",)]
        with pytest.raises(UserError, match="no such folder"):
            cat.add_output(f"{http_folder}/nothing")
        with pytest.raises(UserError, match="cannot reach the server: check the URL"):
            cat.add_output(f"http://127.0.0.1:{_free_port()}/out")


def test_s3_without_credentials_names_what_to_set(s3_server, tmp_path):  # noqa: F811
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=s3_server["endpoint_url"], AWS_DEFAULT_REGION="us-east-1",
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", BLIP3_NO_PROGRESS="1")
    r = _cli(["catalog", "add", f"s3://{BUCKET}/out", "--db", str(tmp_path / "c.duckdb")], env, cwd=tmp_path)
    line = " ".join(r.stderr.split())
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line
