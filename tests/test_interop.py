"""A datagen output opened with the ecosystem's own readers, as users open it: webdataset,
Hugging Face `datasets`, polars and DuckDB over a glob, and img2dataset's own stats reader."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
from PIL import Image

from blip3.core.shards import SIDECAR_COLUMNS
from blip3.datagen.images import ImageOutput
from blip3.datagen.pipeline import JobOptions
from tests.ocr_fixtures import jpeg_bytes, png_bytes, text_image
from tests.test_datagen_pipeline import SizeCaptioner

pytestmark = pytest.mark.slow

#: img2dataset's parquet columns (downloader.py) that tools written for its output select.
IMG2DATASET_COLUMNS = ["key", "url", "caption", "status", "error_message", "width", "height",
                       "original_width", "original_height", "sha256"]


@pytest.fixture(scope="module")
def mixed_output(ray_local, tmp_path_factory):
    """One job over a nested folder of PNG (RGB and RGBA) and JPEG inputs plus one broken file."""
    from blip3.datagen.pipeline import run_job

    root = tmp_path_factory.mktemp("interop")
    src = root / "in"
    for rel, data in {
        "a/one.png": png_bytes(text_image("ONE", size=(120, 48))),
        "a/b/two.jpg": jpeg_bytes(text_image("TWO", size=(128, 48))),
        "three.png": png_bytes(text_image("THREE", size=(136, 48)).convert("RGBA")),
        "c/four.jpg": jpeg_bytes(text_image("FOUR", size=(144, 48))),
        "c/broken.png": b"not an image",
    }.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    out = root / "out"
    run_job(src, out, SizeCaptioner, JobOptions(workers=1, shard_size=3, register=False))
    return src, out


def test_webdataset_to_tuple_jpg(mixed_output):
    import webdataset as wds

    _, out = mixed_output
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    assert [p.split("/")[-1] for p in urls] == ["00000.tar", "00001.tar"]  # img2dataset's name width
    rows = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "txt", "json"))
    assert len(rows) == 4  # every good sample, PNG inputs included, has a .jpg member
    for image, txt, record in rows:
        assert isinstance(image, Image.Image) and txt == f"{image.width}x{image.height}"
    paths = sorted(r[2]["source_path"] for r in rows)  # lineage: the relative source path
    assert paths == ["a/b/two.jpg", "a/one.png", "c/four.jpg", "three.png"]


def test_hugging_face_webdataset_loader(mixed_output, tmp_path):
    from datasets import load_dataset

    _, out = mixed_output
    ds = load_dataset("webdataset", data_files={"train": [str(p) for p in sorted(out.glob("*.tar"))]},
                      split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 4 and {"jpg", "txt", "json"} <= set(ds.column_names)
    assert all(img.format == "JPEG" for img in ds["jpg"])


def test_polars_and_duckdb_over_a_glob(mixed_output):
    import duckdb
    import polars as pl

    _, out = mixed_output
    frame = pl.read_parquet(f"{out}/*.parquet")
    assert frame.columns == SIDECAR_COLUMNS and frame.height == 5
    assert frame.filter(pl.col("status") == "failed")["error_message"].to_list()[0].startswith("decode:")
    counts = dict(duckdb.sql(f"SELECT status, count(*) FROM read_parquet('{out}/*.parquet') GROUP BY ALL").fetchall())
    assert counts == {"success": 4, "failed": 1}


def test_img2dataset_style_reader(mixed_output):
    """Read the output the way img2dataset's own tools do: its stats aggregation (logger.py:
    `SpeedLogger` over `count`/`successes`/`failed_to_*`/`start_time`/`end_time`, `CappedCounter`
    over `status_dict`) and its parquet columns, with `sha256` matching the stored image."""
    import webdataset as wds
    from img2dataset.logger import CappedCounter, SpeedLogger

    _, out = mixed_output
    total = SpeedLogger("total", enable_wandb=False)
    status = CappedCounter()
    for stats_file in sorted(out.glob("*.json")):
        assert int(stats_file.name.split("_")[0]) in (0, 1)  # its shard-id parse of the file name
        stats = json.loads(stats_file.read_text())
        total(count=stats["count"], success=stats["successes"], failed_to_download=stats["failed_to_download"],
              failed_to_resize=stats["failed_to_resize"], start_time=stats["start_time"], end_time=stats["end_time"])
        status.update(CappedCounter.load(stats["status_dict"]))
    assert (total.count, total.success, total.failed_to_download, total.failed_to_resize) == (5, 4, 0, 1)
    assert dict(status.most_common(5)) == {"success": 4, "decode": 1}

    import pyarrow.parquet as pq

    rows = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p, columns=IMG2DATASET_COLUMNS).to_pylist()]
    ok = {r["key"]: r for r in rows if r["status"] == "success"}
    for sample in wds.WebDataset([str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False):
        row = ok[sample["__key__"]]
        assert row["sha256"] == hashlib.sha256(sample["jpg"]).hexdigest()
        assert row["caption"] == sample["txt"].decode()
        assert (row["width"], row["height"]) == Image.open(io.BytesIO(sample["jpg"])).size


def test_keep_format_stores_original_bytes(ray_local, mixed_output, tmp_path):
    from blip3.datagen.pipeline import run_job

    src, _ = mixed_output
    out = tmp_path / "keep"
    run_job(src, out, SizeCaptioner,
            JobOptions(workers=1, shard_size=10, register=False, image_output=ImageOutput("keep"), shard_name_width=6))
    import webdataset as wds

    (tar,) = out.glob("*.tar")
    assert tar.name == "000000.tar"
    exts = sorted(k for s in wds.WebDataset(str(tar), shardshuffle=False) for k in s if not k.startswith("__"))
    assert exts.count("png") == 1 and exts.count("jpg") == 3  # RGB PNG kept; RGBA PNG flattened to jpg
    png = next(s for s in wds.WebDataset(str(tar), shardshuffle=False) if "png" in s)
    assert png["png"] == (src / "a/one.png").read_bytes()


def test_a_cli_job_is_quiet_and_its_summary_is_one_line(mixed_output, tmp_path):
    """`blip3 ocr` piped: no Ray notices (token auth, core_worker), the summary on one line."""
    import os
    import subprocess
    import sys

    src, _ = mixed_output
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "blip3.cli", "ocr", str(src), "-o", str(tmp_path / "o"), "--workers",
                        "1", "--db", str(tmp_path / "c.duckdb")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Token authentication" not in r.stderr and "core_worker" not in r.stderr, r.stderr
    summary = [line for line in r.stderr.splitlines() if "shard(s) written" in line and "catalog source" in line]
    assert len(summary) == 1 and "4 ok, 1 failed (decode: 1)" in summary[0]
