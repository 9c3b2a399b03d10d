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
