"""The shard completion contract, through the real writer on disk.

`catalog add`, export and inline mixture sources trust one rule: a shard whose stats file exists
was published whole. These tests break the publishing steps on purpose and check the rule holds.
"""

from __future__ import annotations

import os
import tarfile
import time

import pytest

from blip3.core.shards import list_shards, shard_complete, shard_paths
from tests.core_fixtures import write_caption_shard


def _record_renames(monkeypatch, fail_on: str | None = None) -> list[str]:
    """Record the final names files are renamed to (in order); raise OSError when `fail_on` is reached,
    as a crash between two renames would leave the folder."""
    published: list[str] = []
    for name in ("replace", "rename"):
        real = getattr(os, name)

        def wrapper(src, dst, *a, _real=real, **kw):
            base = os.path.basename(os.fspath(dst))
            if fail_on is not None and base == fail_on:
                raise OSError(f"simulated crash before publishing {base}")
            published.append(base)
            return _real(src, dst, *a, **kw)

        monkeypatch.setattr(os, name, wrapper)
    return published


def test_stats_file_is_published_after_tar_and_parquet(tmp_path, monkeypatch):
    published = _record_renames(monkeypatch)
    write_caption_shard(tmp_path, 0, 3)
    monkeypatch.undo()
    assert set(published) >= {"00000.tar", "00000.parquet", "00000_stats.json"}
    assert published[-1] == "00000_stats.json"
    assert published.index("00000.tar") < published.index("00000_stats.json")
    assert published.index("00000.parquet") < published.index("00000_stats.json")
    assert shard_complete(tmp_path, 0)


@pytest.mark.parametrize("crash_at", ["00000.tar", "00000.parquet"])
def test_crash_between_renames_leaves_no_complete_looking_shard(tmp_path, monkeypatch, crash_at):
    _record_renames(monkeypatch, fail_on=crash_at)
    with pytest.raises(OSError, match="simulated crash"):
        write_caption_shard(tmp_path, 0, 3)
    monkeypatch.undo()
    _, _, stats = shard_paths(tmp_path, 0)
    assert not stats.exists()
    assert list_shards(tmp_path) == []
    assert not shard_complete(tmp_path, 0)


def test_shard_without_its_parquet_is_not_complete(tmp_path):
    write_caption_shard(tmp_path, 0, 3)
    _, parquet, _ = shard_paths(tmp_path, 0)
    assert shard_complete(tmp_path, 0)
    parquet.unlink()
    assert not shard_complete(tmp_path, 0)
    assert not shard_complete(tmp_path, 0, verify_checksum=False)


def test_tars_written_at_different_times_are_identical(tmp_path, monkeypatch):
    """The wall clock must not reach the tar: write the same shard at two far-apart times."""
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: 1_000_000_000.0)
    write_caption_shard(tmp_path / "a", 0, 4)
    monkeypatch.setattr(time, "time", lambda: 1_700_000_123.0)
    write_caption_shard(tmp_path / "b", 0, 4)
    monkeypatch.setattr(time, "time", real_time)
    ta, _, _ = shard_paths(tmp_path / "a", 0)
    tb, _, _ = shard_paths(tmp_path / "b", 0)
    assert ta.read_bytes() == tb.read_bytes()
    with tarfile.open(ta) as tar:
        members = tar.getmembers()
    assert members and {m.mtime for m in members} == {0}
    assert {(m.mode, m.uname, m.gname) for m in members} == {(0o644, "", "")}
