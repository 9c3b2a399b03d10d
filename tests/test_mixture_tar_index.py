"""The loader's tar index: raw-header parsing for plain tars, `tarfile` for everything else.

Whatever path a tar takes, the index must equal `core.shards.iter_tar_index` (the one definition
of what a sample is), and a damaged tar must still be one clear line."""

from __future__ import annotations

import io
import tarfile

import pytest

import blip3.mixture.tar_index as tar_index
from blip3.core.errors import UserError
from blip3.core.shards import SampleRow, ShardWriter, iter_tar_index
from blip3.mixture.tar_index import index_tar


def _tar(path, members, fmt=tarfile.GNU_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            if data is None:  # a directory
                tar.addfile(tarfile.TarInfo(name) if name.endswith("/") else _dir(name))
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _dir(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def _same(got, want):
    """Equal indexes, the offset where each sample's headers start included (not part of `==`)."""
    assert got == want and [s.header for s in got] == [s.header for s in want]


def _spy(monkeypatch):
    """Count the tars handed to `tarfile` (the fallback)."""
    calls = []
    real = tar_index.iter_tar_index
    monkeypatch.setattr(tar_index, "iter_tar_index", lambda p, **k: calls.append(p) or real(p, **k))
    return calls


def test_a_written_shard_is_indexed_from_raw_headers(tmp_path, monkeypatch):
    with ShardWriter(tmp_path, 0, generator={"name": "t"}) as w:
        for i in range(7):
            w.add(f"k{i:03d}", {"jpg": b"\xff" * (100 * i + 1), "txt": "x" * i, "json": {"i": i}},
                  SampleRow(f"k{i:03d}", image_bytes=100 * i + 1, caption_length=i))
    tar = next(tmp_path.glob("*.tar"))
    calls = _spy(monkeypatch)
    got = index_tar(tar)
    assert calls == []  # the fast path, not tarfile
    _same(got, list(iter_tar_index(tar)))
    assert len(got) == 7


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT])
def test_plain_tars_of_every_format_index_the_same(tmp_path, fmt):
    members = [(f"sub/k{i}.{ext}", bytes([i]) * (511 + i)) for i in range(5) for ext in ("jpg", "json")]
    members.append(("p" * 120 + "/k9.txt", b"long path: a ustar prefix"))  # prefix field (USTAR), else long name
    tar = _tar(tmp_path / "a.tar", members, fmt)
    _same(index_tar(tar), list(iter_tar_index(tar)))


@pytest.mark.parametrize("case", ["long-name", "directory", "symlink", "pax-header"])
def test_anything_unusual_goes_through_tarfile_unchanged(tmp_path, monkeypatch, case):
    members = [("k0.jpg", b"a" * 700), ("k0.txt", b"t")]
    fmt = tarfile.GNU_FORMAT
    if case == "long-name":
        members.append(("k" * 150 + ".txt", b"x"))
    elif case == "directory":
        members.insert(0, ("d", None))
    elif case == "pax-header":
        members.append(("ké.txt", b"x"))  # non-ASCII name: a pax header in PAX format
        fmt = tarfile.PAX_FORMAT
    tar = _tar(tmp_path / "a.tar", members, fmt)
    if case == "symlink":
        with tarfile.open(tar, "a") as t:
            link = tarfile.TarInfo("k1.jpg")
            link.type, link.linkname = tarfile.SYMTYPE, "k0.jpg"
            t.addfile(link)
    calls = _spy(monkeypatch)
    assert index_tar(tar) == list(iter_tar_index(tar))
    assert calls == [tar]


def test_a_damaged_tar_is_one_line_either_way(tmp_path):
    tar = _tar(tmp_path / "a.tar", [(f"k{i}.jpg", b"z" * 2000) for i in range(3)])
    raw = bytearray(tar.read_bytes())
    raw[600] ^= 0xFF  # inside the first member's data: harmless
    raw[2560 + 10] ^= 0xFF  # the second header's name: its checksum no longer matches
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(raw))
    assert index_tar(bad) == list(iter_tar_index(bad))  # tarfile's own reading of it, whatever that is
    cut = tmp_path / "cut.tar"
    cut.write_bytes(tar.read_bytes()[:3500])  # the second member's data runs past the end
    with pytest.raises(UserError) as e:
        index_tar(cut)
    assert "\n" not in str(e.value) and "cut.tar" in str(e.value)


def _header(name, size_field):
    """A GNU header with a raw size field (tarfile would never write a signed one) and a valid checksum."""
    info = tarfile.TarInfo(name)
    head = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    head[124:136] = size_field.ljust(12, b"\0")
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\0 " % sum(head)
    return bytes(head)


class _FewReads(io.BytesIO):
    """Fails after many reads: a scan that steps backwards fails the test instead of running forever."""

    def __init__(self, data):
        super().__init__(data)
        self.reads = 0

    def read(self, n=-1):
        self.reads += 1
        assert self.reads < 100, "the header scan does not advance"
        return super().read(n)


@pytest.mark.parametrize("size_field", [b"-1000", b"-1", b"-0", b"+10", b"1_0"])
def test_a_signed_or_odd_size_field_never_steps_back(tmp_path, size_field):
    data = _header("k0.jpg", size_field) + b"x" * 512 + _header("k1.jpg", b"1") + b"y" * 512 + b"\0" * 1024
    with pytest.raises(tar_index._NotPlain):  # the raw scan hands such a tar to tarfile
        tar_index._plain_members(_FewReads(data), len(data))
    tar = tmp_path / "odd.tar"
    tar.write_bytes(data)
    if size_field.startswith(b"-") and size_field != b"-0":
        with pytest.raises(UserError, match="negative size") as e:
            index_tar(tar)
        assert "\n" not in str(e.value)
    else:
        got = index_tar(tar)
        assert got == list(iter_tar_index(tar)) and all(m.size >= 0 for s in got for m in s.members)


def test_a_member_past_the_end_of_the_file_is_one_line(tmp_path):
    data = _header("k0.jpg", b"77777777777") + b"x" * 512 + b"\0" * 1024  # 8 GiB claimed, 2 KiB there
    tar = tmp_path / "huge.tar"
    tar.write_bytes(data)
    with pytest.raises(UserError) as e:
        index_tar(tar)
    assert "\n" not in str(e.value) and "huge.tar" in str(e.value)
