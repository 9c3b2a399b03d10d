"""The shard completion contract, through the real writer on disk.

`catalog add`, export and inline mixture sources trust one rule: a shard whose stats file exists
was published whole. These tests break the publishing steps on purpose and check the rule holds.
"""

from __future__ import annotations

import json
import os
import tarfile
import time

import pytest

from blip3.core.shards import (
    SampleRow,
    clean_temporaries,
    ShardWriter,
    iter_shard,
    is_image_ext,
    iter_tar_index,
    list_shards,
    read_members,
    resolve_shards,
    shard_complete,
    shard_name,
    shard_paths,
)
from tests.core_fixtures import jpeg, write_caption_shard


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


def test_a_closed_or_aborted_writer_cannot_publish_again(tmp_path):
    w = ShardWriter(tmp_path / "a", 0)
    w.add("k", {"txt": "x"}, SampleRow("k"))
    w.close()
    with pytest.raises(RuntimeError, match="already closed"):
        w.close()
    w = ShardWriter(tmp_path / "b", 0)
    w.add("k", {"txt": "x"}, SampleRow("k"))
    w.abort()
    w.abort()  # idempotent
    with pytest.raises(RuntimeError, match="already closed"):
        w.close()
    assert list((tmp_path / "b").iterdir()) == []


def test_json_members_keep_text_readable_as_utf8(tmp_path):
    with ShardWriter(tmp_path, 0) as w:
        w.add("k", {"json": {"text": "café ☕ 東京"}}, SampleRow("k"))
    (sample,) = iter_shard(shard_paths(tmp_path, 0)[0])
    assert "café ☕ 東京".encode() in sample["json"]


def test_tar_index_and_member_reads_give_back_each_sample(tmp_path):
    keys = write_caption_shard(tmp_path, 0, 4)
    tar = shard_paths(tmp_path, 0)[0]
    index = list(iter_tar_index(tar))
    assert [s.key for s in index] == keys
    assert all([m.ext for m in s.members] == ["jpg", "txt", "json"] for s in index)
    expected = {s["__key__"]: s for s in iter_shard(tar)}
    with open(tar, "rb") as f:
        for s in index:
            got = read_members(f, s)
            assert got == {ext: expected[s.key][ext] for ext in ("jpg", "txt", "json")}
    assert got["jpg"][:2] == jpeg()[:2]  # a JPEG's own bytes


def test_resolve_shards_reads_folders_and_brace_patterns(tmp_path):
    write_caption_shard(tmp_path / "out", 0, 2)
    write_caption_shard(tmp_path / "out", 1, 2)
    (tmp_path / "out" / f".{shard_name(2)}.tar.tmp-1").write_bytes(b"unfinished")
    tars = [str(shard_paths(tmp_path / "out", i)[0].resolve()) for i in (0, 1)]
    assert resolve_shards(tmp_path / "out") == tars
    assert resolve_shards(str(tmp_path / "out" / f"{{{shard_name(0)},{shard_name(1)}}}.tar")) == tars
    assert resolve_shards(f"out/{shard_name(1)}.tar", base=tmp_path) == tars[1:]


def test_json_members_do_not_depend_on_key_order(tmp_path):
    for name, record in (("a", {"uid": "u", "captions": [], "meta": {"x": 1, "y": 2}}),
                         ("b", {"meta": {"y": 2, "x": 1}, "captions": [], "uid": "u"})):
        with ShardWriter(tmp_path / name, 0) as w:
            w.add("k", {"json": record}, SampleRow("k"))
    assert shard_paths(tmp_path / "a", 0)[0].read_bytes() == shard_paths(tmp_path / "b", 0)[0].read_bytes()


@pytest.mark.parametrize("foreign", [
    {"count": 3, "successes": 3, "failed_to_download": 0},  # img2dataset's stats: no shard fields
    {"shard": "not-a-number", "sha256": "x", "tar_bytes": 1, "count": 1, "successes": 1, "failed": 0},
    {"shard": "9", "sha256": "x", "tar_bytes": None, "count": 1, "successes": 1, "failed": 0},
    ["not", "a", "mapping"],
])
def test_foreign_stats_files_are_not_shards(tmp_path, foreign):
    write_caption_shard(tmp_path, 0, 2)
    shard_paths(tmp_path, 9)[2].write_text(json.dumps(foreign))
    assert [i.index for i in list_shards(tmp_path)] == [0]
    assert resolve_shards(tmp_path) == [str(shard_paths(tmp_path, 0)[0].resolve())]


@pytest.mark.parametrize("ext, is_image", [("jpg", True), ("img0.jpg", True), ("0.PNG", True), ("a.b.webp", True),
                                           ("txt", False), ("json", False), ("jpg.txt", False)])
def test_image_members_are_told_by_their_last_extension(ext, is_image):
    assert is_image_ext(ext) is is_image


def test_writer_creates_nested_folders_and_cuts_long_failure_reasons(tmp_path):
    out = tmp_path / "a" / "b" / "c"
    with ShardWriter(out, 0) as w:
        w.add_failure(SampleRow("k", error_message="x" * 200 + ": detail"))
    (info,) = list_shards(out)
    assert info.failure_reasons == {"x" * 80: 1}


def test_abort_after_temporaries_were_cleaned_and_clean_temporaries_counts(tmp_path):
    w = ShardWriter(tmp_path, 0)
    w.add("k", {"txt": "x"}, SampleRow("k"))
    assert clean_temporaries(tmp_path) == 1  # another process tidied the folder meanwhile
    w.abort()  # nothing left to remove: no error
    assert list(tmp_path.iterdir()) == [] and clean_temporaries(tmp_path) == 0


def test_resolve_shards_recursive_glob(tmp_path):
    write_caption_shard(tmp_path / "x" / "y", 0, 1)
    assert resolve_shards(str(tmp_path / "**" / "*.tar")) == [str(shard_paths(tmp_path / "x" / "y", 0)[0].resolve())]
