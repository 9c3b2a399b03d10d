"""Datagen at scale: workers write whole shards, survive a killed worker, and Ray starts cleanly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from blip3.core.shards import file_sha256, list_shards
from blip3.datagen.pipeline import run_job
from blip3.datagen.pipeline import JobOptions
from tests.ocr_fixtures import png_bytes, text_image
from tests.test_datagen_pipeline import SizeCaptioner


def _images(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        (folder / f"img{i}.png").write_bytes(png_bytes(text_image(f"N {i}", size=(80 + 8 * i, 40))))
    return folder


@dataclass
class KillOnce(SizeCaptioner):
    """Kills its own worker process (SIGKILL) at one sample, the first time only."""

    marker: str = ""
    kill_key: str = "img3"

    def annotate(self, image, sample):
        if sample.key == self.kill_key and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().annotate(image, sample)


def _tar_hashes(out: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(out.glob("*.tar"))}


def test_worker_killed_mid_shard_is_retried_to_the_same_bytes(ray_local, tmp_path):
    src = _images(tmp_path / "in", 6)
    ref = tmp_path / "ref"
    run_job(src, ref, SizeCaptioner, JobOptions(workers=1, shard_size=2, register=False))
    marker = tmp_path / "killed"
    out = tmp_path / "out"
    r = run_job(src, out, partial(KillOnce, marker=str(marker)), JobOptions(workers=1, shard_size=2, register=False))
    assert marker.exists(), "the worker was never killed"
    assert (r.shards_written, r.successes, r.failed) == (3, 6, 0)
    assert _tar_hashes(out) == _tar_hashes(ref) and len(_tar_hashes(ref)) == 3
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())  # no temporaries
    assert sum(s.count for s in list_shards(out)) == 6  # each sample once


def test_driver_writes_no_shard_bytes(ray_local, tmp_path):
    """The driver plans and collects stats; the actors write the shards (the driver process never
    opens a tar for writing)."""
    import blip3.core.shards as shards

    src = _images(tmp_path / "in", 4)
    opened: list[int] = []
    real_init = shards.ShardWriter.__init__

    def spy(self, *a, **k):
        opened.append(os.getpid())
        real_init(self, *a, **k)

    shards.ShardWriter.__init__ = spy
    try:
        r = run_job(src, tmp_path / "out", SizeCaptioner, JobOptions(workers=1, shard_size=2, register=False))
    finally:
        shards.ShardWriter.__init__ = real_init
    assert r.shards_written == 2 and len(list_shards(tmp_path / "out")) == 2
    assert opened == []


def _cli(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    code = "import sys; from blip3.cli import main; sys.argv = ['blip3'] + sys.argv[1:]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300,
                          cwd=cwd)


@pytest.mark.slow
def test_run_without_ray_address_ignores_a_stale_cluster_record_and_cleans_up(tmp_path):
    """A dead cluster's `ray_current_cluster` record used to fail every run with a traceback; the
    run starts its own cluster instead, and removes its session folder afterwards."""
    src = _images(tmp_path / "in", 3)
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths have a length limit
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")  # nobody listens there
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=str(ray_tmp), BLIP3_NO_PROGRESS="1")
        r = _cli(["ocr", str(src), str(tmp_path / "out"), "--workers", "1", "--db", str(tmp_path / "c.duckdb")], env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        assert len(list_shards(tmp_path / "out")) == 1
        assert not list((ray_tmp / "ray").glob("session_2*")), "the job's Ray session folder was left behind"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_ray_address_nobody_answers_is_one_line_at_once(tmp_path):
    """`--ray-address` naming a port where no cluster listens used to hang past 120 s in Ray's
    own retries; it is one line, exit 2, before any work."""
    import socket

    src = _images(tmp_path / "in", 1)
    with socket.socket() as s:  # a port that was free a moment ago: nobody listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = _cli(["ocr", str(src), "-o", str(tmp_path / "out"), "--ray-address", f"127.0.0.1:{port}",
              "--db", str(tmp_path / "c.duckdb")], env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"cannot connect to Ray at 127.0.0.1:{port}: connection refused" in " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_object_store_output_without_its_filesystem_is_one_line_not_a_local_folder(tmp_path):
    """`gs://bucket/out` used to exit 0 having written a local folder `gs:`; object stores are now
    written through fsspec (tests/test_storage_s3.py), and one whose fsspec package is missing
    (gcsfs here) is one clear line, exit 2."""
    from blip3.core.errors import UserError
    from blip3.core.storage import local_path

    src = _images(tmp_path / "in", 1)
    r = _cli(["ocr", str(src), "gs://bucket/out", "--db", str(tmp_path / "c.duckdb")], dict(os.environ), cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "gs:// outputs need their fsspec filesystem" in " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no `gs:` folder, no catalog
    assert local_path(f"file://{tmp_path}/x", "output") == tmp_path / "x"
    assert local_path("rel/out", "output") == Path("rel/out")
    with pytest.raises(UserError, match="hf:// locations"):
        local_path(Path("hf://datasets/x"), "output")  # what pathlib leaves of a URL is caught too


def test_tar_index_memory_stays_flat_in_the_number_of_members(tmp_path):
    """Planning over a big input tar keeps no per-member state: tarfile's own member list would
    hold one TarInfo per member (about 2 MB for 5k members)."""
    import io
    import tarfile
    import tracemalloc

    from blip3.datagen.inputs import iter_raw_refs
    from blip3.datagen.plans import iter_plans

    path = tmp_path / "big.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(5_000):
            info = tarfile.TarInfo(f"{i:07d}.jpg")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    tracemalloc.start()
    try:
        n = sum(len(p.refs) for p in iter_plans(iter_raw_refs(path), 100))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 5_000
    assert peak < 1_000_000, f"planning 5k members peaked at {peak / 1e6:.1f} MB"


def _grounding_reference(tmp_path: Path) -> tuple[Path, Path, Path]:
    """8 images with a COCO file, and their shards from a local one-worker run at 2 per shard:
    (images, coco file, reference output) for the multi-node runs to match byte for byte."""
    from blip3.datagen.grounding import make_config

    src = _images(tmp_path / "in", 8)
    coco = tmp_path / "coco.json"
    coco.write_text('{"images": [' + ", ".join(
        f'{{"id": {i}, "file_name": "img{i}.png"}}' for i in range(8)) + '], "annotations": ['
        '{"id": 1, "image_id": 3, "bbox": [1, 2, 30, 20], "category_id": 1}], '
        '"categories": [{"id": 1, "name": "sign"}]}')
    ref = tmp_path / "ref"
    run_job(src, ref, make_config(detector="annotations", annotations=coco),
            JobOptions(workers=1, shard_size=2, register=False))
    return src, coco, ref


@pytest.mark.slow
def test_multi_node_cluster_joined_by_address_writes_the_bytes_of_a_local_run(ray_local, tmp_path):
    """Two raylets (`ray.cluster_utils.Cluster`), joined with --ray-address: each node's actors
    write their shards themselves, byte-identical to a local one-worker run."""
    from ray.cluster_utils import Cluster

    src, coco, ref = _grounding_reference(tmp_path)

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        out = tmp_path / "out"
        r = _cli(["ground", str(src), str(out), "--detector", "annotations", "--annotations", str(coco),
                  "--workers", "2", "--shard-size", "2", "--ray-address", cluster.address,
                  "--db", str(tmp_path / "c.duckdb")], env)
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        cluster.shutdown()
    assert _tar_hashes(out) == _tar_hashes(ref) and len(_tar_hashes(ref)) == 4


def test_url_list_fetches_only_http_urls(tmp_path):
    """urllib also opens file:// URLs: a list naming a local file must never have it read into the
    corpus; the row is failed with its reason, the http rows are fetched."""
    from blip3.datagen.inputs import iter_refs, load_sample
    from tests.ocr_fixtures import LocalServer

    www = tmp_path / "www"
    www.mkdir()
    img = png_bytes(text_image("OK"))
    (www / "a.png").write_bytes(img)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG top secret bytes")
    with LocalServer(www) as server:
        urls = tmp_path / "urls.csv"
        urls.write_text("url,uid\n"
                        f"{server.url}/a.png,u0\n"
                        f"file://{secret},u1\n"
                        "file:///etc/passwd,u2\n"
                        "ftp://example.invalid/x.png,u3\n")
        refs = list(iter_refs(urls))
        samples = [load_sample(r) for r in refs]
    assert [r.uid for r in refs] == ["u0", "u1", "u2", "u3"]
    assert refs[0].error is None and samples[0].image == img
    assert refs[1].error == "url_scheme: only http(s) URLs are fetched, not file://"
    assert refs[1].url == f"file://{secret}" and refs[2].url == "file:///etc/passwd"
    assert refs[3].error.endswith("not ftp://")
    assert all(s.image == b"" and s.error == r.error for s, r in zip(samples[1:], refs[1:]))


def _flaky_server(root: Path):
    """Serve `root` on 127.0.0.1, failing each path's first request with 500 (a transient error)."""
    import functools
    import http.server
    import threading

    seen: set[str] = set()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path not in seen:
                seen.add(self.path)
                self.send_error(500, "try again")
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.slow
def test_url_download_retries_are_settable_and_retry_transient_errors(tmp_path):
    from blip3.core.errors import UserError
    from blip3.datagen.fetch import DownloadOptions
    from blip3.datagen.inputs import iter_refs, load_sample

    with pytest.raises(UserError, match="--download-threads"):
        DownloadOptions(threads=0).check()
    (tmp_path / "www").mkdir()
    img = png_bytes(text_image("OK"))
    (tmp_path / "www" / "a.png").write_bytes(img)
    for retries, expect_ok in ((0, False), (1, True)):
        server = _flaky_server(tmp_path / "www")
        try:
            urls = tmp_path / f"urls{retries}.csv"
            urls.write_text(f"url\nhttp://127.0.0.1:{server.server_address[1]}/a.png\n")
            [ref] = iter_refs(urls)
            sample = load_sample(ref, DownloadOptions(threads=1, timeout=5, retries=retries))
        finally:
            server.shutdown()
            server.server_close()
        if expect_ok:
            assert sample.error is None and sample.image == img
        else:
            assert sample.error == "download: HTTP Error 500: try again" and sample.image == b""
