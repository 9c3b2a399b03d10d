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
    run_job(src, ref, SizeCaptioner, workers=1, shard_size=2, register=False)
    marker = tmp_path / "killed"
    out = tmp_path / "out"
    r = run_job(src, out, partial(KillOnce, marker=str(marker)), workers=1, shard_size=2, register=False)
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
        r = run_job(src, tmp_path / "out", SizeCaptioner, workers=1, shard_size=2, register=False)
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


def test_object_store_output_is_refused_not_written_to_a_local_folder(tmp_path):
    """`s3://bucket/out` used to exit 0 having written a local folder `s3:`; now one clear line, exit 2."""
    from blip3.core.errors import UserError
    from blip3.core.storage import local_path

    src = _images(tmp_path / "in", 1)
    for out in ("s3://bucket/out", "gs://bucket/out"):
        r = _cli(["ocr", str(src), out, "--db", str(tmp_path / "c.duckdb")], dict(os.environ), cwd=tmp_path)
        assert r.returncode == 2, r.stderr[-2000:]
        assert f"{out.split(':')[0]}:// locations are not supported" in " ".join(r.stderr.split())
        assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no `s3:` / `gs:` folder, no catalog
    assert local_path(f"file://{tmp_path}/x", "output") == tmp_path / "x"
    assert local_path("rel/out", "output") == Path("rel/out")
    with pytest.raises(UserError, match="hf:// locations"):
        local_path(Path("hf://datasets/x"), "output")  # what pathlib leaves of a URL is caught too
