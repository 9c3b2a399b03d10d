"""Shards on an object store (`Location`): the completion check, stats reading and the removal of
left-over shards, on fsspec's local filesystem (the same code paths as S3; `test_storage_s3.py`
runs them against a real S3 server end to end)."""

from __future__ import annotations

import json

import pytest

from blip3.core.shards import read_stats, shard_complete, shard_name, shard_paths
from blip3.core.storage import Location
from tests.core_fixtures import write_caption_shard


@pytest.fixture
def remote(tmp_path):
    local = tmp_path / "local"
    for i in range(3):
        write_caption_shard(local, i, 2 + i)
    out = Location(f"file://{tmp_path / 'bucket' / 'out'}")
    (tmp_path / "bucket" / "out").mkdir(parents=True)
    for i in range(3):
        out.publish(local, shard_name(i))
    return local, out


def test_published_remote_shards_are_complete_and_read_alike(remote):
    local, out = remote
    for i in range(3):
        assert shard_complete(out, i) and shard_complete(out, i, verify_checksum=False)
        assert read_stats(out, i) == read_stats(local, i)
    assert not shard_complete(out, 3) and read_stats(out, 3) is None


def test_remote_shard_missing_a_part_is_not_complete(remote, tmp_path):
    _, out = remote
    out.remove(f"{shard_name(0)}.parquet")
    assert not shard_complete(out, 0, verify_checksum=False)
    out.remove(f"{shard_name(1)}.tar")
    assert not shard_complete(out, 1, verify_checksum=False)
    assert shard_complete(out, 2)


def test_remote_tar_is_checked_by_size_then_by_checksum(remote, tmp_path):
    _, out = remote
    tar = tmp_path / "bucket" / "out" / f"{shard_name(0)}.tar"
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF  # same size, other bytes
    tar.write_bytes(bytes(data))
    assert shard_complete(out, 0, verify_checksum=False)  # the size matches: trusted without the hash
    assert not shard_complete(out, 0)
    tar.write_bytes(bytes(data) + b"\0" * 512)
    assert not shard_complete(out, 0, verify_checksum=False)


def test_unreadable_remote_stats_mean_not_complete(remote, tmp_path):
    _, out = remote
    (tmp_path / "bucket" / "out" / f"{shard_name(1)}_stats.json").write_bytes(b"\xff\xfe not json")
    assert read_stats(out, 1) is None and not shard_complete(out, 1)
    (tmp_path / "bucket" / "out" / f"{shard_name(2)}_stats.json").write_text("{broken")
    assert read_stats(out, 2) is None


def test_remove_remote_shards_keeps_the_ones_below_and_others_files(remote, tmp_path):
    local, out = remote
    folder = tmp_path / "bucket" / "out"
    (folder / "notes.txt").write_text("x")
    (folder / "abc.tar").write_bytes(b"x")
    (folder / "0000000.tar").write_bytes(b"x")  # shard 0 at another name width: not one of ours to keep
    assert out.remove_shards(keep_below=1, digits=5) == [0, 1, 2]
    assert sorted(out.names()) == sorted([*(p.name for p in shard_paths(local, 0)), "notes.txt", "abc.tar"])
    assert shard_complete(out, 0)
    assert out.remove_shards(digits=5) == [0]
    assert sorted(out.names()) == ["abc.tar", "notes.txt"]


def test_remove_remote_shards_finds_each_kind_of_left_over(tmp_path):
    """A stats file, a parquet or a tar alone marks a left-over shard."""
    folder = tmp_path / "out"
    folder.mkdir()
    for i, suffix in enumerate(("_stats.json", ".parquet", ".tar")):
        (folder / f"{shard_name(i + 4)}{suffix}").write_text(json.dumps({}))
    out = Location(f"file://{folder}")
    assert out.remove_shards(keep_below=4, digits=5) == [4, 5, 6]
    assert out.names() == []
