"""A `blip3 ocr` killed mid-way and run again gives the shards of an uninterrupted run, no duplicates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from blip3.cli import app
from blip3.core.shards import clean_temporaries, file_sha256, read_sidecar, shard_complete
from tests.ocr_fixtures import png_bytes, text_image

pytestmark = pytest.mark.slow
# Enough shards that the kill lands mid-way even when Ray hands back rows in bursts on a busy machine.
N_IMAGES, SHARD_SIZE = 32, 2
WORDS = ["ALPHA", "BRAVO", "CHARLIE", "DELTA", "ECHO", "FOXTROT", "GOLF", "HOTEL", "INDIA", "JULIET", "KILO",
         "LIMA", "MIKE", "NOVEMBER"]


def _ocr_args(src, out, db) -> list[str]:
    return ["ocr", str(src), str(out), "--workers", "1", "--shard-size", str(SHARD_SIZE), "--db", str(db)]


def test_killed_run_resumes_to_identical_shards(ray_local, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(N_IMAGES):
        word = WORDS[i % len(WORDS)]
        (src / f"img{i:02d}.png").write_bytes(png_bytes(text_image(f"{word} {i}", size=(360, 96))))
    n_shards = N_IMAGES // SHARD_SIZE

    # 1. uninterrupted reference run (in-process, on the session cluster)
    ref = tmp_path / "ref"
    r = CliRunner().invoke(app, _ocr_args(src, ref, tmp_path / "ref.duckdb"))
    assert r.exit_code == 0, r.output

    # 2. the same command in a child process joining the cluster, killed once its first shard exists
    out = tmp_path / "out"
    code = "import sys; from cli import main; sys.argv = ['blip3'] + sys.argv[1:]; main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *_ocr_args(src, out, tmp_path / "out.duckdb"), "--ray-address", ray_local],
        env={**os.environ, "BLIP3_NO_PROGRESS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.time() + 180
    while not (out / "00000_stats.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no shard appeared"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = [i for i in range(n_shards) if shard_complete(out, i)]
    assert 0 < len(done_at_kill) < n_shards, f"the kill must land mid-way, finished: {done_at_kill}"
    finished_stats = {i: (out / f"{i:05d}_stats.json").stat().st_mtime_ns for i in done_at_kill}

    # 3. run again: finished shards skipped, the rest redone
    r = CliRunner().invoke(app, _ocr_args(src, out, tmp_path / "out.duckdb"))
    assert r.exit_code == 0, r.output
    assert f"{n_shards - len(done_at_kill)} shard(s) written, {len(done_at_kill)} already done" in " ".join(r.output.split())
    for i, mtime in finished_stats.items():
        assert (out / f"{i:05d}_stats.json").stat().st_mtime_ns == mtime  # not rewritten
    assert clean_temporaries(out) == 0  # no leftovers of the killed writer

    ref_tars = sorted(p.name for p in ref.glob("*.tar"))
    assert ref_tars == sorted(p.name for p in out.glob("*.tar")) and len(ref_tars) == n_shards
    for name in ref_tars:
        assert file_sha256(out / name) == file_sha256(ref / name), name
    keys = [k for p in sorted(out.glob("*.parquet")) for k in read_sidecar(p).column("key").to_pylist()]
    assert len(keys) == len(set(keys)) == N_IMAGES

    # 4. --overwrite redoes every shard, to the same bytes
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*_stats.json")}
    r = CliRunner().invoke(app, [*_ocr_args(src, out, tmp_path / "out.duckdb"), "--overwrite"])
    assert r.exit_code == 0 and f"{n_shards} shard(s) written, 0 already done" in " ".join(r.output.split()), r.output
    assert all((out / name).stat().st_mtime_ns != mtime for name, mtime in before.items())
    for name in ref_tars:
        assert file_sha256(out / name) == file_sha256(ref / name), name
