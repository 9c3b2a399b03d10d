import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from blip3.core.keys import is_safe_key, sanitize_key
from blip3.core.shards import (
    SIDECAR_COLUMNS,
    SampleRow,
    ShardWriter,
    iter_shard,
    list_shards,
    shard_complete,
    shard_paths,
)
from tests.core_fixtures import jpeg, tmpfs, write_caption_shard

REPO = Path(__file__).resolve().parents[1]


def test_round_trip_our_reader_and_webdataset(tmp_path):
    keys = write_caption_shard(tmp_path, 0, 5, n_failed=2)
    tar, parquet, stats = shard_paths(tmp_path, 0)
    assert tar.exists() and parquet.exists() and stats.exists()

    ours = list(iter_shard(tar))
    assert [s["__key__"] for s in ours] == keys
    assert json.loads(ours[0]["json"])["uid"] == keys[0]

    theirs = list(wds.WebDataset(str(tar), shardshuffle=False))
    assert [s["__key__"] for s in theirs] == keys
    for a, b in zip(ours, theirs):
        assert a["jpg"] == b["jpg"] and a["txt"] == b["txt"] and a["json"] == b["json"]

    side = pq.read_table(parquet)
    assert side.column_names == SIDECAR_COLUMNS
    assert side.num_rows == 7
    statuses = side.column("status").to_pylist()
    assert statuses.count("success") == 5 and statuses.count("failed") == 2
    errors = {r["error_message"] for r in side.to_pylist() if r["status"] == "failed"}
    assert errors == {"decode: cannot identify image file"}

    s = json.loads(stats.read_text())
    assert (s["count"], s["successes"], s["failed"]) == (7, 5, 2)
    assert s["status_dict"] == {"success": 5, "decode": 2}  # img2dataset's keys
    assert (s["failed_to_download"], s["failed_to_resize"]) == (0, 2) and s["duration"] >= 0
    assert shard_complete(tmp_path, 0)
    assert [i.index for i in list_shards(tmp_path)] == [0]


def test_tars_are_deterministic(tmp_path):
    write_caption_shard(tmp_path / "a", 0, 4)
    write_caption_shard(tmp_path / "b", 0, 4)
    ta, _, _ = shard_paths(tmp_path / "a", 0)
    tb, _, _ = shard_paths(tmp_path / "b", 0)
    assert ta.read_bytes() == tb.read_bytes()


def _tarfile_reference(members: list[tuple[str, bytes]]) -> bytes:
    """The tar `tarfile` writes for these members with the writer's settings (GNU format, mode
    0644, mtime 0, no owner): the bytes every shard had before the writer built headers itself."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_tar_bytes_are_tarfiles_own(tmp_path):
    """Sizes either side of a block, empty members, text and json members, and a member name over
    100 bytes (tarfile's GNU long-name path): byte for byte what tarfile writes."""
    sizes = [0, 1, 511, 512, 513, 1024, 10_240, 10_239, 70_000]
    long_ext = "x" * 40 + ".jpg"
    members = []
    with ShardWriter(tmp_path, 0) as w:
        for i, size in enumerate(sizes):
            key = f"k{i:03d}" + "a" * (90 if i == 3 else 0)
            data = bytes((i * 7 + j) % 251 for j in range(size))
            record = {"key": key, "é": i}
            group = {"jpg": data, "txt": f"caption {i} ünï", "json": record}
            if i == 3:
                group[long_ext] = data
            w.add(key, group, SampleRow(key))
            members += [(f"{key}.jpg", data), (f"{key}.txt", f"caption {i} ünï".encode()),
                        (f"{key}.json", json.dumps(record, ensure_ascii=False, sort_keys=True).encode())]
            if i == 3:
                members.append((f"{key}.{long_ext}", data))
    tar, _, stats = shard_paths(tmp_path, 0)
    assert any(len(name) > 100 for name, _ in members)
    assert tar.read_bytes() == _tarfile_reference(members)
    assert json.loads(stats.read_text())["tar_bytes"] == tar.stat().st_size
    assert [m.name for m in tarfile.open(tar)] == [name for name, _ in members]


def test_empty_shard_is_tarfiles_empty_archive(tmp_path):
    with ShardWriter(tmp_path, 0) as w:
        w.add_failure(SampleRow("a", error_message="decode: cannot identify image file"))
    tar, _, _ = shard_paths(tmp_path, 0)
    assert tar.read_bytes() == _tarfile_reference([])


def test_exception_inside_writer_publishes_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, 3) as w:
            w.add("k1", {"jpg": jpeg()}, SampleRow("k1"))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_killed_writer_leaves_no_complete_looking_tar(tmp_path):
    """SIGKILL a process in the middle of a shard: no NNNNNN.tar, no stats, shard not complete."""
    script = textwrap.dedent(
        f"""
        import time
        from blip3.core.shards import ShardWriter, SampleRow
        w = ShardWriter({str(tmp_path)!r}, 0)
        for i in range(10_000):
            w.add(f"k{{i}}", {{"bin": b"x" * 4096}}, SampleRow(f"k{{i}}"))
            if i == 50:
                print("writing", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    tar, parquet, stats = shard_paths(tmp_path, 0)
    assert not tar.exists() and not parquet.exists() and not stats.exists()
    assert not shard_complete(tmp_path, 0)
    assert list_shards(tmp_path) == []
    assert any(p.name.startswith(".00000.tar.tmp-") for p in tmp_path.iterdir())


def test_truncated_tar_is_not_complete(tmp_path):
    write_caption_shard(tmp_path, 0, 3)
    tar, _, _ = shard_paths(tmp_path, 0)
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    assert not shard_complete(tmp_path, 0)
    tar.write_bytes(data[:-1] + b"\x01")  # same size, different bytes
    assert not shard_complete(tmp_path, 0)
    assert shard_complete(tmp_path, 0, verify_checksum=False)


@pytest.mark.parametrize(
    "raw",
    ["../x", "../../etc/passwd", "/abs/path.jpg", "a/b/c", "café ☕ 東京", "name.with.dots", "", "..", "-lead", "x" * 500],
)
def test_sanitize_key_is_safe_and_deterministic(raw, tmp_path):
    key = sanitize_key(raw)
    assert is_safe_key(key), key
    assert key == sanitize_key(raw)
    assert "/" not in key and "." not in key
    with ShardWriter(tmp_path, 0) as w:
        w.add(key, {"txt": "t"}, SampleRow(key))
    names = [p.name for p in tmp_path.rglob("*")]
    assert all(Path(n).parent == Path(".") for n in names)
    assert (tmp_path / "00000.tar").exists()


def test_sanitize_key_keeps_nested_paths_readable():
    assert sanitize_key("cats/tabby/01").startswith("cats_tabby_01_")
    assert sanitize_key("photos/été/IMG 0001").startswith("photos_ete_IMG_0001_")
    deep = sanitize_key("a" * 80 + "/" + "b" * 80 + "/leaf_name")
    assert is_safe_key(deep) and "leaf_name_" in deep  # a long path keeps its file name


def test_sanitize_key_keeps_clean_keys_and_separates_collisions():
    assert sanitize_key("abc_123-x") == "abc_123-x"
    assert sanitize_key("a/b") != sanitize_key("a_b")
    assert sanitize_key("a/b") != sanitize_key("a.b")


def test_unsafe_key_is_refused_by_writer(tmp_path):
    with pytest.raises(ValueError, match="unsafe shard key"):
        with ShardWriter(tmp_path, 0) as w:
            w.add("../escape", {"txt": "t"}, SampleRow("../escape"))
    assert not any(tmp_path.parent.glob("escape*"))


def test_duplicate_key_is_recorded_not_written_twice(tmp_path):
    with ShardWriter(tmp_path, 0) as w:
        assert w.add("dup", {"txt": "first"}, SampleRow("dup"))
        assert not w.add("dup", {"txt": "second"}, SampleRow("dup"))
    samples = list(iter_shard(tmp_path / "00000.tar"))
    assert [s["txt"] for s in samples] == [b"first"]
    side = pq.read_table(tmp_path / "00000.parquet").to_pylist()
    assert [r["status"] for r in side] == ["success", "failed"]
    assert side[1]["error_message"].startswith("duplicate key")


def test_a_writer_that_fails_on_a_full_disk_leaves_no_temporary_files(tmp_path, monkeypatch):
    """ENOSPC while publishing (here from fsync, the write boundary) or while adding (a real tiny
    tmpfs when it can be mounted): the error reaches the caller and the folder holds no temp files."""
    import errno
    import shutil
    import subprocess

    from blip3.core.shards import SampleRow, ShardWriter

    out = tmp_path / "out"
    w = ShardWriter(out, 0)
    w.add("k", {"txt": "x"}, SampleRow("k"))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("blip3.core.shards.os.fsync", full)
    with pytest.raises(OSError) as e:
        w.close()
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(out)  # the error names the disk
    assert list(out.iterdir()) == []
    monkeypatch.undo()

    with tmpfs(tmp_path / "disk", "size=16k") as disk:
        with pytest.raises(OSError) as e:
            with ShardWriter(disk, 0) as w:
                for i in range(8):
                    w.add(f"k{i}", {"bin": os.urandom(8192)}, SampleRow(f"k{i}"))
        assert e.value.errno == errno.ENOSPC and e.value.filename is not None
        assert list(disk.iterdir()) == []
