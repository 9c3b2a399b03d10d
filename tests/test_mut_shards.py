"""Shard corners that mutation testing found unguarded: member headers at the 8 GiB size limit of
the octal form, and the single read of a sample's members."""

from __future__ import annotations

import io
import tarfile

import pytest

from blip3.core.shards import _member_header, iter_tar_index, read_members, shard_paths
from tests.core_fixtures import write_caption_shard


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uname = info.gname = ""
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


@pytest.mark.parametrize("size", [0, 1234, 8**11 - 1, 8**11, 10 * 2**30])
def test_member_headers_are_tarfiles_own_up_to_and_past_8_gib(size):
    """Headers are built without a data block, so sizes past the octal field (8 GiB, where GNU's
    base-256 form starts) are checked without writing them."""
    header = _member_header("abc.jpg", size)
    assert header == _tarfile_header("abc.jpg", size)
    assert tarfile.TarInfo.frombuf(header[:512], "utf-8", "surrogateescape").size == size


def test_a_sample_is_read_in_one_read_of_its_own_bytes(tmp_path):
    """`read_members` reads from the first member's data to the last member's end, no further."""
    write_caption_shard(tmp_path, 0, 3)
    tar = shard_paths(tmp_path, 0)[0]
    samples = list(iter_tar_index(tar))
    data = tar.read_bytes()

    class Counting(io.BytesIO):
        reads: list[int] = []

        def read(self, n=-1):
            self.reads.append(n)
            return super().read(n)

    f = Counting(data)
    for s in samples:
        f.reads.clear()
        got = read_members(f, s)
        first, last = s.members[0], s.members[-1]
        assert f.reads == [last.offset + last.size - first.offset]
        assert got == {m.ext: data[m.offset: m.offset + m.size] for m in s.members}


def test_a_folder_that_cannot_be_fsynced_still_gets_its_shard(tmp_path, monkeypatch):
    """Some filesystems refuse fsync on a directory (EINVAL); the files themselves are fsynced, so
    publishing goes on."""
    import errno
    import os
    import stat

    from blip3.core.shards import shard_complete

    real = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_caption_shard(tmp_path, 0, 2)
    assert shard_complete(tmp_path, 0)


def test_a_writer_failing_on_a_bad_row_leaves_no_files(tmp_path):
    """Not only a full disk: any error while publishing (here a row Arrow cannot store) removes the
    temporary tar and parquet, and nothing appears under the final names."""
    import pyarrow as pa

    from blip3.core.shards import SampleRow, ShardWriter
    from tests.core_fixtures import jpeg

    w = ShardWriter(tmp_path, 0)
    w.add("a", {"jpg": jpeg(), "txt": "x"}, SampleRow("a", width="wide"))  # type: ignore[arg-type]
    with pytest.raises((pa.ArrowException, TypeError, ValueError)):
        w.close()
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_cannot_be_opened_for_fsync_still_gets_its_shard(tmp_path, monkeypatch):
    import os

    from blip3.core.shards import shard_complete

    real = os.open

    def opener(path, flags, *a, **kw):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", opener)
    write_caption_shard(tmp_path, 0, 2)
    assert shard_complete(tmp_path, 0)


def test_sample_rows_refuse_misspelt_columns():
    from blip3.core.shards import SampleRow

    with pytest.raises(AttributeError):
        SampleRow("k").error = "decode: x"  # type: ignore[attr-defined]


def test_stats_duration_and_failure_reasons(tmp_path):
    import json

    from blip3.core.shards import SampleRow, ShardWriter

    with ShardWriter(tmp_path, 0) as w:
        w.add_failure(SampleRow("a", status="failed", error_message="r" * 100 + ": detail"))
    stats = json.loads(shard_paths(tmp_path, 0)[2].read_text())
    assert stats["status_dict"] == {"r" * 80: 1}  # reasons are cut at 80 characters
    assert stats["end_time"] >= stats["start_time"]
    assert stats["duration"] == round(stats["end_time"] - stats["start_time"], 4)


def test_list_shards_skips_foreign_stats_names_and_keeps_going(tmp_path):
    from blip3.core.shards import is_shard_folder, list_shards

    write_caption_shard(tmp_path, 0, 1)
    (tmp_path / "-backup_stats.json").write_text("{}")  # sorts before the shards' names
    assert [i.index for i in list_shards(tmp_path)] == [0]
    assert is_shard_folder(tmp_path)
    assert not is_shard_folder(shard_paths(tmp_path, 0)[0])  # a file is not a folder


def test_resolve_shards_takes_a_folders_own_tars_before_nested_ones(tmp_path):
    from blip3.core.shards import resolve_shards

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / "sub" / "b.tar").write_bytes(b"")
    assert resolve_shards(tmp_path) == [str((tmp_path / "a.tar").resolve())]


def test_tar_index_reports_links_but_not_folders(tmp_path):
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tar:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        link = tarfile.TarInfo("k.lnk")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        f = tarfile.TarInfo("k.txt")
        f.size = 2
        tar.addfile(f, io.BytesIO(b"hi"))
    assert [s.key for s in iter_tar_index(path)] == ["k"]  # no list given: links are just not samples
    skipped: list[tarfile.TarInfo] = []
    assert [s.key for s in iter_tar_index(path, skipped=skipped)] == ["k"]
    assert [m.name for m in skipped] == ["k.lnk"]
