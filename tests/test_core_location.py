"""`core.storage.Location`: one type for a local folder and an object-store prefix (a real
S3-compatible server, moto's server mode on 127.0.0.1, reached through s3fs), and its writer lock."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from blip3.core import storage
from blip3.core.errors import UserError
from blip3.core.shards import SampleRow, Shard, ShardInfo, ShardWriter, file_sha256
from blip3.core.storage import LOCK_NAME, Location, output_location
from tests.test_storage_s3 import BUCKET, s3_server  # noqa: F401 - the fixture


def _write(where: Location, index: int, n: int) -> Shard:
    with ShardWriter(where, index, generator={"name": "t"}) as w:
        for i in range(n):
            w.add(f"k{i}", {"txt": f"caption {i}"}, SampleRow(f"k{i}"))
        return w.close()


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path):
    if request.param == "local":
        return Location(tmp_path / "out")
    options = request.getfixturevalue("s3_server")
    return Location(f"s3://{BUCKET}/{tmp_path.name}/out", options)


def test_a_shard_published_anywhere_reads_back_the_same(folder, tmp_path):
    """Publish, list, open, is-complete and remove behave alike on a local folder and on S3, and
    the writer's record is the one the folder lists back."""
    written = [_write(folder, i, 2 + i) for i in range(2)]
    local = Location(tmp_path / "ref")
    ref = [_write(local, i, 2 + i) for i in range(2)]
    assert folder.finished() == written
    assert [s.tar for s in written] == [folder.where("00000.tar"), folder.where("00001.tar")]
    assert [(s.sha256, s.tar_bytes, s.count) for s in written] == [(s.sha256, s.tar_bytes, s.count) for s in ref]
    assert sorted(folder.names()) == sorted(local.names())  # no temporaries, no lock left behind
    with folder.open("00001.tar") as f:
        assert f.read() == Path(ref[1].tar).read_bytes()
    assert folder.is_complete("00000") and folder.sha256("00000.tar") == file_sha256(ref[0].tar)
    folder.remove("00001.parquet")
    assert not folder.is_complete("00001", verify_checksum=False)
    assert folder.remove_shards(keep_below=1, digits=5) == [1]
    assert [s.index for s in folder.finished()] == [0]
    assert pickle.loads(pickle.dumps(folder)) == folder


def test_one_record_for_a_shard():
    assert ShardInfo is Shard and storage.RemoteDir is Location


@pytest.mark.parametrize("where, words", [
    ("memory://x/out", "memory:// lives in one process"),
    ("https://example.org/out", "read-only"),
    ("simplecache::memory://x", "chained URL"),
    ("simplecache::s3://b/x", "chained URL"),
    ("file://rel/out", "names the host 'rel'"),
])
def test_outputs_that_cannot_hold_a_job_are_refused_up_front(where, words):
    with pytest.raises(UserError, match=words):
        output_location(where)


def test_file_urls_are_local_paths(tmp_path):
    assert Location(f"file://{tmp_path}/a").local_path == tmp_path / "a"
    assert Location(f"file://localhost{tmp_path}/a").local_path == tmp_path / "a"
    assert Location("rel/out").local_path == Path("rel/out").resolve()
    assert Location("s3://b/p/").url == "s3://b/p" and Location("s3://b/p").local_path is None


# -- the writer's lock ---------------------------------------------------------------------------
def test_a_second_writer_is_refused_while_the_first_holds_the_lock(folder, monkeypatch):
    monkeypatch.setattr(storage, "LOCK_SETTLE_S", 0.05)
    with folder.lock("first job"):
        assert folder.exists(LOCK_NAME)
        with pytest.raises(UserError, match=r"another job \(first job\) is writing this output"):
            with Location(folder.url, folder.storage_options).lock("second job"):
                pass
    assert not folder.exists(LOCK_NAME)
    with folder.lock("third job"):  # released: the next job takes it
        pass


def test_a_dead_jobs_lock_is_taken_over(folder, monkeypatch):
    """A lock whose process has ended on this host, or whose heartbeat stopped LOCK_STALE_S ago."""
    monkeypatch.setattr(storage, "LOCK_SETTLE_S", 0.05)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease = {"token": "x", "job": "killed", "host": storage.socket.gethostname(), "pid": int(dead.stdout),
             "started": 0, "heartbeat": 1e12}
    folder.mkdir()
    with folder.staged_file(LOCK_NAME) as p:
        p.write_text(json.dumps(lease))
    with folder.lock("next"):
        pass
    with folder.staged_file(LOCK_NAME) as p:
        p.write_text(json.dumps({**lease, "host": "elsewhere", "pid": os.getpid(), "heartbeat": storage.time.time()}))
    with pytest.raises(UserError, match="another job"):
        with folder.lock("next"):
            pass
    monkeypatch.setattr(storage, "LOCK_STALE_S", -1.0)  # its heartbeat is now too old
    with folder.lock("next"):
        pass


def test_a_lease_overwritten_by_a_racing_job_stops_this_one(s3_server, tmp_path, monkeypatch):  # noqa: F811
    """Object stores have no create-if-absent: the lease is read back after the settle time, and the
    job whose lease is not there any more is refused."""
    where = Location(f"s3://{BUCKET}/{tmp_path.name}/race", s3_server)
    real = storage.time.sleep

    def racing(seconds):  # another job writes its lease while this one settles
        where.fs.pipe_file(where.path(LOCK_NAME), json.dumps(
            {"token": "other", "job": "racer", "host": "elsewhere", "pid": 1, "started": 0,
             "heartbeat": storage.time.time()}).encode())
        real(0)

    monkeypatch.setattr(storage.time, "sleep", racing)
    with pytest.raises(UserError, match=r"another job \(racer\)"):
        with where.lock("me"):
            pass


def test_a_local_lock_file_appears_whole(tmp_path, monkeypatch):
    """A racing job that finds the lock file reads a whole lease, never a file created and not yet
    written (which it would take for no lock, and write its own: two jobs on one output). The lock
    appears by a hard link of a finished file; without hard links, by create-if-absent."""
    seen = []
    link = os.link

    def watched(src, dst):
        seen.append(json.loads(Path(src).read_text())["job"])  # the lease is complete before it appears
        link(src, dst)

    monkeypatch.setattr(storage.os, "link", watched)
    with Location(str(tmp_path / "out")).lock("first"):
        assert seen == ["first"]
        assert json.loads((tmp_path / "out" / LOCK_NAME).read_text())["job"] == "first"
        with pytest.raises(UserError, match=r"another job \(first\) is writing"):
            Location(str(tmp_path / "out")).lock("second").__enter__()
    assert not (tmp_path / "out").exists()  # released, and the folder it made removed

    def no_links(src, dst):
        raise PermissionError("hard links not supported")

    monkeypatch.setattr(storage.os, "link", no_links)
    with Location(str(tmp_path / "out2")).lock("third"):
        assert json.loads((tmp_path / "out2" / LOCK_NAME).read_text())["job"] == "third"
        with pytest.raises(UserError, match=r"another job \(third\)"):
            Location(str(tmp_path / "out2")).lock("fourth").__enter__()


def test_the_lock_leaves_no_empty_output_folder_behind(tmp_path):
    with Location(tmp_path / "new").lock():
        assert (tmp_path / "new").is_dir()
    assert not (tmp_path / "new").exists()


def test_a_job_into_an_output_another_job_is_writing_is_refused_before_it_writes(tmp_path):
    """Two jobs on one output folder used to mix their shards (and one's temporary-file cleanup
    removed the other's files); the second is now refused in one line, before it touches the folder."""
    from blip3.datagen.pipeline import JobOptions, run_job
    from tests.test_datagen_pipeline import SizeCaptioner
    from tests.test_datagen_scale import _images

    src, out = _images(tmp_path / "in", 2), tmp_path / "out"
    out.mkdir()
    (out / ".00000.tar.tmp-123-abcd").write_bytes(b"the running job's shard in progress")
    with Location(out).lock("ground in"):
        with pytest.raises(UserError, match=r"another job \(ground in\) is writing this output"):
            run_job(src, out, SizeCaptioner, JobOptions(workers=1, shard_size=8, register=False))
        assert sorted(p.name for p in out.iterdir()) == sorted([LOCK_NAME, ".00000.tar.tmp-123-abcd"])


_RACER = """
import json, sys, time
from blip3.core.errors import UserError
from blip3.core.storage import Location
url, options, start = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))  # every racer asks at the same moment
try:
    with Location(url, options).lock("racer"):
        print("got", flush=True)
        time.sleep(3)
except UserError:
    print("refused", flush=True)
"""


@pytest.mark.slow
def test_of_racing_jobs_exactly_one_gets_the_lock(folder):
    """Four processes ask for the lock at the same moment: one goes on, three are refused, on a
    local folder (create-if-absent) and on S3 (lease written, read back after the settle time)."""
    env = dict(os.environ, BLIP3_NO_PROGRESS="1")
    start = storage.time.time() + 3
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, folder.url, json.dumps(folder.storage_options),
                                str(start)], stdout=subprocess.PIPE, text=True, env=env) for _ in range(4)]
    outcomes = sorted(p.communicate(timeout=120)[0].strip() for p in racers)
    assert outcomes == ["got", "refused", "refused", "refused"]
