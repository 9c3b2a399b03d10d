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
