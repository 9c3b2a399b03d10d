"""Outputs on an object store: a real S3-compatible server (moto's server mode on 127.0.0.1),
started here, reached through s3fs exactly as a user's bucket would be. Never a mocked client."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import duckdb
import pytest

from blip3.core.errors import UserError
from blip3.core.shards import file_sha256
from blip3.core.storage import Location, output_location, parse_storage_options
from blip3.datagen.fetch import DownloadOptions
from blip3.datagen.pipeline import run_job
from blip3.datagen.pipeline import JobOptions
from tests.test_datagen_pipeline import SizeCaptioner
from tests.test_datagen_scale import _cli, _grounding_reference, _images, _tar_hashes

BUCKET = "shards"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free local port; yields the storage options that reach it."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing",
               "client_kwargs": {"region_name": "us-east-1"}}
    try:
        import boto3

        boto3.client("s3", endpoint_url=options["endpoint_url"], aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield options
    finally:
        server.stop()


def _remote_hashes(remote: Location) -> dict[str, str]:
    import hashlib

    return {n: hashlib.sha256(remote.read_bytes(n)).hexdigest() for n in sorted(remote.names()) if n.endswith(".tar")}


def test_job_to_s3_writes_the_bytes_of_a_local_run_stats_last_and_resumes(ray_local, s3_server, tmp_path):
    src = _images(tmp_path / "in", 6)
    ref = tmp_path / "ref"
    run_job(src, ref, SizeCaptioner, JobOptions(workers=1, shard_size=2, register=False))
    url = f"s3://{BUCKET}/job1/out"
    r = run_job(src, url, SizeCaptioner, JobOptions(workers=2, shard_size=2, register=False, storage_options=s3_server))
    assert (r.shards_written, r.successes, r.failed) == (3, 6, 0)
    remote = Location(url, s3_server)
    assert _remote_hashes(remote) == _tar_hashes(ref) and len(_tar_hashes(ref)) == 3
    assert sorted(remote.names()) == sorted(p.name for p in ref.iterdir())  # no temporaries, parquet + stats too
    stats = json.loads(remote.read_bytes("00001_stats.json"))
    assert stats["sha256"] == file_sha256(ref / "00001.tar") and stats["count"] == 2
    assert not (tmp_path / "s3:").exists() and not Path("s3:").exists()

    # resume: finished shards are skipped; a shard whose stats object is missing is redone
    remote.remove("00002_stats.json")
    r2 = run_job(src, url, SizeCaptioner,
                 JobOptions(workers=1, shard_size=2, register=False, storage_options=s3_server))
    assert (r2.shards_skipped, r2.shards_written) == (2, 1)
    assert _remote_hashes(remote) == _tar_hashes(ref)
    # a tar of the wrong size does not pass for finished
    remote.fs.pipe_file(remote.path("00000.tar"), b"truncated")
    r3 = run_job(src, url, SizeCaptioner,
                 JobOptions(workers=1, shard_size=2, register=False, storage_options=s3_server))
    assert (r3.shards_skipped, r3.shards_written) == (2, 1) and _remote_hashes(remote) == _tar_hashes(ref)
    # a smaller --limit removes the shards beyond it (stats objects first)
    r4 = run_job(src, url, SizeCaptioner,
                 JobOptions(workers=1, shard_size=2, limit=2, register=False, storage_options=s3_server))
    assert r4.shards_total == 1 and sorted(remote.names()) == ["00000.parquet", "00000.tar", "00000_stats.json"]


def test_stats_object_is_uploaded_after_tar_and_parquet(s3_server, tmp_path):
    from blip3.core.shards import SampleRow, ShardWriter

    remote = Location(f"s3://{BUCKET}/order", s3_server)
    uploaded: list[str] = []
    real = Location.put

    def spy(self, path, name):
        uploaded.append(name)
        real(self, path, name)

    Location.put = spy
    try:
        with ShardWriter(remote, 0) as w:  # written in a local staging folder, then uploaded
            w.add("a", {"txt": "x"}, SampleRow("a"))
    finally:
        Location.put = real
    assert uploaded[-1] == "00000_stats.json" and sorted(uploaded) == sorted(remote.names())


def test_cli_writes_to_s3_with_environment_variables_or_storage_options(ray_local, s3_server, tmp_path):
    src = _images(tmp_path / "in", 3)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(AWS_ENDPOINT_URL=s3_server["endpoint_url"], AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", BLIP3_NO_PROGRESS="1")
    coco = tmp_path / "coco.json"
    coco.write_text('{"images": [{"id": 1, "file_name": "img1.png"}], "annotations": [{"id": 1, "image_id": 1, '
                    '"bbox": [1, 2, 30, 20], "category_id": 1}], "categories": [{"id": 1, "name": "sign"}]}')
    base = ["ground", str(src), "--detector", "annotations", "--annotations", str(coco), "--workers", "1",
            "--ray-address", ray_local, "--db", str(tmp_path / "c.duckdb")]
    r = _cli(base + ["-o", f"s3://{BUCKET}/cli/env"], env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "catalog source env" in " ".join(r.stderr.split())  # catalogued by its URL
    con = duckdb.connect(str(tmp_path / "c.duckdb"), read_only=True)
    assert con.execute("SELECT path, n_samples FROM shards").fetchall() == [(f"s3://{BUCKET}/cli/env/00000.tar", 3)]
    con.close()
    assert sorted(Location(f"s3://{BUCKET}/cli/env", s3_server).names()) == [
        "00000.parquet", "00000.tar", "00000_stats.json"]
    # the same through --storage-options, no environment; a wrong endpoint fails in one line
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(var)
    r = _cli(base + ["-o", f"s3://{BUCKET}/cli/opts", "--storage-options", json.dumps(s3_server)], env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(Location(f"s3://{BUCKET}/cli/opts", s3_server).names()) == 3
    r = _cli(base + ["-o", f"s3://{BUCKET}/cli/x", "--storage-options", "[1]"], env, cwd=tmp_path)
    assert r.returncode == 2 and "must be a JSON object" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "s3:").exists()


def test_storage_locations_and_options_are_checked():
    assert output_location("rel/out").local_path == Path("rel/out").resolve()
    assert output_location("s3://b/p", {"anon": True}).local_path is None
    with pytest.raises(UserError, match="not valid JSON"):
        parse_storage_options("{nope")
    assert parse_storage_options(None) == {} and parse_storage_options('{"anon": true}') == {"anon": True}
    import pickle

    d = pickle.loads(pickle.dumps(Location("memory://x/y", {"a": 1})))
    assert (d.url, d.storage_options, d.name) == ("memory://x/y", {"a": 1}, "y")


def test_missing_s3fs_names_the_extra_to_install(monkeypatch):
    import fsspec.core

    def missing(*a, **k):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", missing)
    with pytest.raises(UserError, match=r"pip install 'blip3-engine\[s3\]'"):
        Location("s3://b/p").fs


@pytest.mark.slow
def test_multi_node_cluster_writes_to_s3_the_bytes_of_a_local_run(ray_local, s3_server, tmp_path):
    """Two raylets (`ray.cluster_utils.Cluster`) joined with --ray-address, output on the S3
    server given by environment variables only: each node's actors upload their own shards (the
    variables reach them from the client), byte-identical to a local one-worker run."""
    from ray.cluster_utils import Cluster

    src, coco, ref = _grounding_reference(tmp_path)

    url = f"s3://{BUCKET}/multi/out"
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(AWS_ENDPOINT_URL=s3_server["endpoint_url"], AWS_ACCESS_KEY_ID="testing",
                   AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        r = _cli(["ground", str(src), "-o", url, "--detector", "annotations", "--annotations", str(coco),
                  "--workers", "2", "--shard-size", "2", "--ray-address", cluster.address,
                  "--db", str(tmp_path / "c.duckdb")], env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        cluster.shutdown()
    remote = Location(url, s3_server)
    assert _remote_hashes(remote) == _tar_hashes(ref) and len(_tar_hashes(ref)) == 4
    assert sorted(remote.names()) == sorted(p.name for p in ref.iterdir())


def test_catalog_add_of_a_store_out_of_reach_is_one_line_naming_what_to_set(tmp_path):
    """A dead endpoint names AWS_ENDPOINT_URL; no `s3:` folder appears."""
    env = dict(os.environ, AWS_ENDPOINT_URL=f"http://127.0.0.1:{_free_port()}", AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", AWS_MAX_ATTEMPTS="1")
    r = _cli(["catalog", "add", "s3://bucket/out", "--db", str(tmp_path / "c.duckdb")], env, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    line = " ".join(r.stderr.split())
    assert "cannot reach the endpoint" in line and "AWS_ENDPOINT_URL" in line and "Traceback" not in r.stderr
    assert not (tmp_path / "s3:").exists()


def test_output_inside_an_object_store_input_folder_is_refused():
    for out in ("s3://b/in", "s3://b/in/out/"):
        with pytest.raises(UserError, match="inside the input folder"):
            run_job("s3://b/in/", out, SizeCaptioner, JobOptions(register=False))


def _upload(local: Path, url: str, options: dict) -> None:
    store = Location(url, options)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            store.fs.put_file(str(p), store.path(p.relative_to(local).as_posix()))


def test_folders_and_tars_on_s3_as_inputs_give_the_bytes_of_local_inputs(ray_local, s3_server, tmp_path):
    """Images and tars read where they lie on the store (tars counted and read by Ray tasks, member
    by member, with ranged reads): the shards are the bytes of the same inputs read locally, and a
    tar job's finished shards are found done whichever location the tars are read from."""
    from tests.test_datagen_tar_plans import wds_tars

    src = _images(tmp_path / "in", 5)
    (src / "sub").mkdir()
    (src / "sub" / "img9.png").write_bytes((src / "img1.png").read_bytes())
    (src / "img2.txt").write_text("alt text of two\n")
    pattern = wds_tars(tmp_path / "wds")
    opts = JobOptions(workers=1, shard_size=2, register=False, storage_options=s3_server)
    _upload(src, f"s3://{BUCKET}/inputs/folder", s3_server)
    _upload(tmp_path / "wds", f"s3://{BUCKET}/inputs/wds", s3_server)

    run_job(src, tmp_path / "ref-folder", SizeCaptioner, opts)
    r = run_job(f"s3://{BUCKET}/inputs/folder/", tmp_path / "folder", SizeCaptioner, opts)
    assert (r.samples, r.successes) == (6, 6)
    assert _tar_hashes(tmp_path / "folder") == _tar_hashes(tmp_path / "ref-folder")
    assert b"alt text of two" in (tmp_path / "folder" / "00001.tar").read_bytes()

    ref = tmp_path / "ref-wds"
    run_job(pattern, ref, SizeCaptioner, opts)
    for n, url in enumerate((f"s3://{BUCKET}/inputs/wds/part-{{000..002}}.tar", f"s3://{BUCKET}/inputs/wds")):
        out = tmp_path / f"out{n}"
        r = run_job(url, out, SizeCaptioner, opts)
        assert (r.shards_written, r.samples) == (8, 15), url
        assert _tar_hashes(out) == _tar_hashes(ref) and len(_tar_hashes(ref)) == 8, url
    r = run_job(f"s3://{BUCKET}/inputs/wds", ref, SizeCaptioner, opts)
    assert (r.shards_skipped, r.shards_written) == (8, 0)


@pytest.mark.slow
def test_cli_reads_s3_tars_with_environment_variables(ray_local, s3_server, tmp_path):
    """`blip3 ground s3://...` with the store given by the standard environment variables only: the
    counting tasks and the shard workers reach it as the shell does."""
    src, coco, ref = _grounding_reference(tmp_path)
    import tarfile

    with tarfile.open(tmp_path / "imgs.tar", "w") as tar:
        for p in sorted(src.iterdir()):
            tar.add(p, arcname=p.name)
    Location(f"s3://{BUCKET}/cli-in", s3_server).put(tmp_path / "imgs.tar", "imgs.tar")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(AWS_ENDPOINT_URL=s3_server["endpoint_url"], AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    args = ["ground", "--detector", "annotations", "--annotations", str(coco), "--workers", "1", "--shard-size", "2",
            "--ray-address", ray_local, "--db", str(tmp_path / "c.duckdb")]
    r = _cli(args + [f"s3://{BUCKET}/cli-in/imgs.tar", str(tmp_path / "out")], env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    local = _cli(args + [str(tmp_path / "imgs.tar"), str(tmp_path / "local")], env, cwd=tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    assert _tar_hashes(tmp_path / "out") == _tar_hashes(tmp_path / "local") and len(_tar_hashes(tmp_path / "out")) == 4


def test_verify_rehashes_tars_on_the_store(ray_local, s3_server, tmp_path):
    """A tar changed on the store but of the recorded size passes for finished (the sha256 is
    trusted from the stats) unless `verify=True`, which re-reads it and redoes the shard."""
    src = _images(tmp_path / "in", 2)
    url = f"s3://{BUCKET}/verify/out"
    run_job(src, url, SizeCaptioner, JobOptions(workers=1, shard_size=2, register=False, storage_options=s3_server))
    remote = Location(url, s3_server)
    good = remote.read_bytes("00000.tar")
    remote.fs.pipe_file(remote.path("00000.tar"), bytes(len(good)))  # same size, other bytes
    r = run_job(src, url, SizeCaptioner, JobOptions(workers=1, shard_size=2, register=False, storage_options=s3_server))
    assert r.shards_skipped == 1
    r = run_job(src, url, SizeCaptioner,
                JobOptions(workers=1, shard_size=2, register=False, storage_options=s3_server, verify=True))
    assert r.shards_written == 1 and remote.read_bytes("00000.tar") == good


def test_url_list_on_the_store_is_read_and_missing_store_inputs_are_one_line(ray_local, s3_server, tmp_path):
    """A URL list (jsonl here) on s3:// is read from a local copy: every row becomes a sample (these
    URLs refuse connections, so each is a failure row with its reason, none lost)."""
    store = Location(f"s3://{BUCKET}/lists", s3_server)
    rows = "".join(json.dumps({"url": f"http://127.0.0.1:9/{i}.jpg", "caption": f"c{i}"}) + "\n" for i in range(3))
    store.fs.pipe_file(store.path("urls.jsonl"), rows.encode())
    out = tmp_path / "out"
    r = run_job(f"s3://{BUCKET}/lists/urls.jsonl", out, SizeCaptioner,
                JobOptions(workers=1, shard_size=2, register=False, storage_options=s3_server, download=DownloadOptions(threads=1, timeout=2, retries=0)))
    assert (r.shards_total, r.samples, r.successes, r.failed) == (2, 3, 0, 3)
    assert set(r.failure_reasons) == {"download"}
    for missing, words in ((f"s3://{BUCKET}/lists/none.jsonl", "input does not exist"),
                           (f"s3://{BUCKET}/lists/000.tar", "000.tar: cannot read: FileNotFoundError"),
                           (f"s3://{BUCKET}/nothing/here", "input does not exist")):
        with pytest.raises(UserError, match=words):
            run_job(missing, tmp_path / "out2", SizeCaptioner,
                    JobOptions(workers=1, register=False, storage_options=s3_server))
