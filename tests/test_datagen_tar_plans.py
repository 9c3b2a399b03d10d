"""Tar inputs planned from per-tar counts: the driver cuts shards from counts made by tasks near
the data and never reads a tar; the shards are those of the listed refs, byte for byte."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from blip3.core.errors import UserError
from blip3.core.shards import file_sha256
from blip3.datagen.images import ImageLimits
from blip3.datagen.inputs import TarSource, count_tar, iter_raw_refs
from blip3.datagen.pipeline import JobOptions, run_job, write_shard
from blip3.datagen.plans import count_tars_locally, iter_plans, job_plans
from tests.ocr_fixtures import png_bytes, text_image
from tests.test_datagen_pipeline import SizeCaptioner


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def wds_tars(folder: Path, sizes: tuple[int, ...] = (7, 1, 5)) -> str:
    """Tars of `sizes` samples (images of distinct sizes, so their captions differ) with captions,
    json, a repeated key, a second image under one key, a long member name and a symlink: every
    way a sample can give more or fewer refs than one. Returns the brace pattern."""
    folder.mkdir()
    n = 0
    for t, size in enumerate(sizes):
        with tarfile.open(folder / f"part-{t:03d}.tar", "w") as tar:
            for i in range(size):
                img = png_bytes(text_image(f"{n}", size=(40 + 4 * n, 24)))
                key = f"s{i % 4}" if t == 0 else ("x" * 120 if i == 2 else f"k{i}")  # keys repeat in tar 0
                _add(tar, f"{key}.png", img)
                _add(tar, f"{key}.txt", f"caption {n}".encode())
                _add(tar, f"{key}.json", json.dumps({"uid": f"u{n}"}).encode())
                if t == 2 and i == 1:
                    _add(tar, f"{key}.jpg", img)  # a second image under one key: a failed ref of its own
                n += 1
            if t == 2:
                link = tarfile.TarInfo("lnk.png")
                link.type, link.linkname = tarfile.SYMTYPE, "k0.png"
                tar.addfile(link)
    return str(folder / ("part-{000..%03d}.tar" % (len(sizes) - 1)))


def _view(plans) -> list[tuple[int, list[tuple]]]:
    return [(p.index, [(r.key, r.ext, r.locator, r.uid, r.source_caption, r.error) for r in p.refs]) for p in plans]


@pytest.mark.parametrize("shard_size,limit", [(3, None), (2, None), (4, 9), (100, None), (1, 3)])
def test_tar_plans_are_the_listed_plans(tmp_path, shard_size, limit):
    pattern = wds_tars(tmp_path / "in")
    listed = list(iter_plans(iter_raw_refs(pattern), shard_size, limit=limit))
    counted = list(job_plans(pattern, None, shard_size, limit=limit, count_tars=count_tars_locally))
    assert [p.size for p in counted] == [len(p.refs) for p in listed]
    assert all(p._refs is None and p.spans for p in counted)  # only ranges until a worker reads them
    assert _view(counted) == _view(listed)
    again = list(job_plans(pattern, None, shard_size, limit=limit, count_tars=count_tars_locally))
    assert [p.digest for p in again] == [p.digest for p in counted]  # re-runs and resumes: same shards
    assert len({p.digest for p in counted}) == len(counted)


def test_a_count_lets_a_shard_scan_start_near_its_range(tmp_path):
    """Seeks every `every` refs: a later range is read from a header near it, not from the top,
    and a tar with a link (whose ref comes after all samples) keeps only the top."""
    pattern = wds_tars(tmp_path / "in")
    big, linked = TarSource(str(tmp_path / "in" / "part-000.tar")), TarSource(str(tmp_path / "in" / "part-002.tar"))
    count = count_tar(big, 3)
    assert (count.refs, count.size) == (7, os.path.getsize(big.where.url))
    assert [s[0] for s in count.seeks] == [0, 3, 6] and count.seeks[1][1] > 0
    assert count_tar(linked, 1).seeks == [(0, 0)] and count_tar(linked, 1).refs == 5 + 1 + 1
    plans = list(job_plans(pattern, None, 3, count_tars=count_tars_locally))
    assert plans[2].spans[0].seek == count.seeks[2]
    scanned: list[int] = []
    real = TarSource.scan

    def spy(self, start=0, **kw):
        for sample in real(self, start, **kw):
            scanned.append((self.name, sample.header))
            yield sample

    TarSource.scan = spy
    try:
        refs = plans[2].refs  # refs 6 of tar 0, then 0..1 of tar 1 and 2
    finally:
        TarSource.scan = real
    assert [r.source_caption for r in refs] == ["caption 6", "caption 7", "caption 8"]
    assert min(h for name, h in scanned if name == big.name) == count.seeks[2][1]  # not tar 0's top


def test_unreadable_or_missing_tars_are_one_line(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(UserError, match="not a readable tar"):
        list(job_plans(str(tmp_path / "bad.tar"), None, 2, count_tars=count_tars_locally))
    assert "cannot read" in count_tar(TarSource(str(tmp_path / "gone.tar")), 2).error



def test_a_tar_changed_after_its_count_is_one_line_not_a_short_shard(tmp_path):
    """Plans are cut from counts made before the shards' tasks read the tars: a tar rewritten in
    between (other bytes, or fewer samples in the same bytes) fails its shard in one line."""
    pattern = wds_tars(tmp_path / "in")
    plans = list(job_plans(pattern, None, 3, count_tars=count_tars_locally))
    first = tmp_path / "in" / "part-000.tar"
    original = first.read_bytes()
    first.write_bytes(original[:-10240])  # the end-of-archive record gone: shorter
    with pytest.raises(UserError, match="changed since it was counted") as e:
        plans[0].refs
    assert "\n" not in str(e.value) and "part-000.tar" in str(e.value)
    with tarfile.open(first, "w") as tar:  # two samples, padded to the counted size
        for i in range(2):
            _add(tar, f"k{i}.txt", b"x")
    first.write_bytes(first.read_bytes().ljust(len(original), b"\0"))
    with pytest.raises(UserError, match="holds 2 of the 3 samples counted") as e:
        plans[0].refs
    assert "\n" not in str(e.value) and "part-000.tar" in str(e.value)
    first.write_bytes(original)
    assert [r.source_caption for r in plans[0].refs] == ["caption 0", "caption 1", "caption 2"]

def test_job_over_tars_reads_no_tar_in_the_driver_and_writes_the_listed_shards(ray_local, tmp_path, monkeypatch):
    """The driver plans a tar job from counts made by Ray tasks: it opens no tar itself (a driver
    that enumerated the members would fail here), and the shards are the bytes the listed plans give."""
    pattern = wds_tars(tmp_path / "in")
    ann = SizeCaptioner()
    ref = tmp_path / "ref"
    for plan in iter_plans(iter_raw_refs(pattern), 3):
        write_shard(ref, plan, ann, ImageLimits(), {}, ann.generator_info())
    opened: list[str] = []
    real = tarfile.open

    def spy(*a, **k):
        opened.append(str(a[0] if a else k.get("name") or k.get("fileobj")))
        return real(*a, **k)

    monkeypatch.setattr(tarfile, "open", spy)
    r = run_job(pattern, tmp_path / "out", SizeCaptioner, JobOptions(workers=1, shard_size=3, register=False))
    monkeypatch.undo()
    assert opened == [], f"the driver opened input tars: {opened[:3]}"
    assert (r.shards_total, r.samples) == (5, 15) and r.failure_reasons == {"duplicate_member": 1, "tar_link": 1}
    hashes = {p.name: file_sha256(p) for p in sorted((tmp_path / "out").glob("*.tar"))}
    assert hashes == {p.name: file_sha256(p) for p in sorted(ref.glob("*.tar"))} and len(hashes) == 5
    r2 = run_job(pattern, tmp_path / "out", SizeCaptioner, JobOptions(workers=1, shard_size=3, register=False))
    assert (r2.shards_skipped, r2.shards_written) == (5, 0)  # resume: the same plans, found done


def test_img2dataset_parts_are_planned_from_their_row_counts(tmp_path):
    """An img2dataset folder: each part counted from its parquet footer, each shard's rows read by
    its task; the plans are the listed ones (failed downloads and a part without a tar included)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "i2d"
    folder.mkdir()
    n = 0
    for part, size in enumerate((5, 3, 4)):
        rows = []
        with tarfile.open(folder / f"{part:05d}.tar", "w") as tar:
            for i in range(size):
                key = f"{part:05d}{i:04d}"
                ok = i % 3 != 1
                if ok:
                    _add(tar, f"{key}.jpg", png_bytes(text_image(f"{n}", size=(40 + 4 * n, 24))))
                rows.append({"key": key, "url": f"http://h/{n}", "caption": f"c{n}", "uid": f"u{n}",
                             "status": "success" if ok else "failed_to_download",
                             "error_message": None if ok else "HTTP Error 404"})
                n += 1
        pq.write_table(pa.Table.from_pylist(rows[::-1]), folder / f"{part:05d}.parquet")  # completion order
    (folder / "00001.tar").unlink()  # every row of part 1 becomes a failed ref
    for shard_size, limit in ((2, None), (5, None), (3, 10)):
        listed = list(iter_plans(iter_raw_refs(folder), shard_size, limit=limit))
        counted = list(job_plans(str(folder), None, shard_size, limit=limit, count_tars=count_tars_locally))
        assert all(p._refs is None for p in counted)
        assert _view(counted) == _view(listed)
