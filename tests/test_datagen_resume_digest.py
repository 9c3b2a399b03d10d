"""Resume sees changed inputs (docs/datagen README, "What resume promises"): a finished shard is
reused only when the stamp of each input is the one it was made from, at a cost flat per input
(a stat per file, the member headers already read while counting a tar)."""

from __future__ import annotations

import io
import tarfile

from blip3.datagen.pipeline import JobOptions, run_job
from tests.ocr_fixtures import png_bytes, text_image
from tests.test_datagen_pipeline import SizeCaptioner

OPTS = JobOptions(workers=1, shard_size=4, register=False)


def test_a_fixed_image_in_a_folder_is_done_again(ray_local, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes(text_image("A", size=(64, 40))))
    (src / "b.png").write_bytes(b"")
    r = run_job(src, tmp_path / "out", SizeCaptioner, OPTS)
    assert (r.successes, r.failure_reasons) == (1, {"empty": 1})
    (src / "b.png").write_bytes(png_bytes(text_image("B", size=(72, 40))))
    r = run_job(src, tmp_path / "out", SizeCaptioner, OPTS)
    assert (r.shards_written, r.successes, r.failed) == (1, 2, 0)
    r = run_job(src, tmp_path / "out", SizeCaptioner, OPTS)  # nothing changed: reused
    assert (r.shards_skipped, r.shards_written) == (1, 0)


def _tar(path, caption: str, mtime: int) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.png", png_bytes(text_image("A", size=(64, 40)))), ("a.txt", caption.encode())):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))


def test_a_tar_rewritten_to_the_same_size_is_done_again(ray_local, tmp_path):
    from blip3.core.shards import iter_shard

    tar = tmp_path / "in.tar"
    _tar(tar, "a cat", mtime=1_000_000)
    run_job(tar, tmp_path / "out", SizeCaptioner, OPTS)
    size = tar.stat().st_size
    _tar(tar, "a dog", mtime=2_000_000)  # rewritten later: another source caption, the same size
    assert tar.stat().st_size == size
    r = run_job(tar, tmp_path / "out", SizeCaptioner, OPTS)
    assert (r.shards_written, r.shards_skipped) == (1, 0)
    (sample,) = iter_shard(tmp_path / "out" / "00000.tar")
    assert b'"source_caption": "a dog"' in sample["json"]
