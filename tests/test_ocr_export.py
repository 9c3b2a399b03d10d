"""`export_blip3_ocr` re-exports replace the previous parts instead of mixing with them."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from blip3.core.shards import SampleRow, ShardWriter
from blip3.datagen.ocr_export import export_blip3_ocr
from tests.ocr_fixtures import png_bytes, text_image


def _ocr_shard(out, keys: list[str]) -> None:
    with ShardWriter(out, 0) as w:
        for key in keys:
            record = {"key": key, "uid": f"u-{key}", "url": None, "captions": [{"text": key}],
                      "metadata": {"entries": []}}
            w.add(key, {"png": png_bytes(text_image(key, size=(60, 30))), "txt": key, "json": json.dumps(record)},
                  SampleRow(key))
        w.close()


def _rows(parquet_dir) -> list[str]:
    return sorted(uid for p in sorted(parquet_dir.glob("part-*.parquet")) for uid in pq.read_table(p)["uid"].to_pylist())


def test_smaller_reexport_leaves_no_stale_parts(tmp_path):
    big, small, dest = tmp_path / "big", tmp_path / "small", tmp_path / "export"
    _ocr_shard(big, ["a", "b", "c"])
    _ocr_shard(small, ["d"])
    files, n = export_blip3_ocr(big, dest, rows_per_file=1)
    assert n == 3 and len(files) == 3 and _rows(dest) == ["u-a", "u-b", "u-c"]
    files, n = export_blip3_ocr(small, dest, rows_per_file=1)
    assert n == 1 and [Path(f).name for f in files] == ["part-00000.parquet"]
    assert _rows(dest) == ["u-d"]
    assert sorted(p.name for p in dest.iterdir()) == ["part-00000.parquet"]  # no staging folder left


def test_every_app_gets_its_own_export_group():
    """Registering on a fresh app (as each CLI test run does) always adds `blip3 export blip3-ocr`."""
    import typer

    from blip3.datagen.commands import register

    for _ in range(20):  # apps freed in between: a group cached by id(app) would go to a dead app
        app = typer.Typer()
        register(app)
        groups = [g for g in app.registered_groups if g.name == "export"]
        assert len(groups) == 1
        assert [c.name for c in groups[0].typer_instance.registered_commands] == ["blip3-ocr"]
        del app, groups
