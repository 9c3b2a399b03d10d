"""`blip3.datagen.ray` in a user's own Ray Data pipeline: images read by Ray Data, our annotator,
our sink give the tars `blip3 ocr` / `blip3 ground` write for the same inputs, byte for byte; and
`read_shards` reads them back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blip3.cli import app
from blip3.core.shards import file_sha256, list_shards, read_sidecar
from tests.ocr_fixtures import RENDERED, png_bytes, render
from tests.test_datagen_scale import _images


@pytest.fixture
def ordered(ray_local):
    """Rows reach the sink in input order (Ray Data may reorder otherwise), as a user keeps it."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    yield
    ctx.execution_options.preserve_order = saved


def _tars(out: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(out.glob("*.tar"))}


def _cli(args: list[str]) -> None:
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output


def test_read_binary_files_then_our_ocr_and_sink_give_the_tar_of_blip3_ocr(ordered, tmp_path):
    import ray.data

    from blip3.datagen.ray import OCR, ShardSink, read_shards

    src = tmp_path / "in"
    src.mkdir()
    for spec in RENDERED[:3]:
        (src / f"{spec.name}.png").write_bytes(png_bytes(render(spec)))
    (src / "empty.png").write_bytes(b"")  # a failed row, with its reason, in both
    _cli(["ocr", str(src), "-o", str(tmp_path / "cli"), "--workers", "1", "--shard-size", "100",
          "--db", str(tmp_path / "c.duckdb")])

    ds = ray.data.read_binary_files(str(src), include_paths=True)
    ds = ds.map_batches(OCR, fn_constructor_kwargs={"root": str(src)}, compute=ray.data.ActorPoolStrategy(size=1),
                        batch_size=2)
    sink = ShardSink(tmp_path / "lib")
    ds.repartition(1).write_datasink(sink)

    assert _tars(tmp_path / "lib") == _tars(tmp_path / "cli") and len(_tars(tmp_path / "cli")) == 1
    assert sink.shards[0]["count"] == 4 and sink.shards[0]["failure_reasons"] == {"empty": 1}
    side = read_sidecar(tmp_path / "lib" / "00000.parquet").to_pylist()
    assert side == [dict(r, sha256=r["sha256"]) for r in read_sidecar(tmp_path / "cli" / "00000.parquet").to_pylist()]
    (stats,) = list_shards(tmp_path / "lib")
    assert stats.count == 4 and stats.successes == 3

    back = sorted(read_shards(tmp_path / "lib").take_all(), key=lambda r: r["__key__"])
    assert [r["__key__"] for r in back] == sorted(spec.name for spec in RENDERED[:3])
    assert {json.loads(r["json"])["metadata"]["entries"] != [] for r in back} == {True}


def test_read_images_then_our_grounding_and_sink_give_the_shards_of_blip3_ground(ordered, tmp_path):
    """Pixels (`read_images`) rather than bytes, boxes from a COCO file (`--detector annotations`),
    two samples per shard as the CLI's `--shard-size 2`."""
    import ray.data

    from blip3.datagen.ray import Grounding, ShardSink

    src = _images(tmp_path / "in", 6)
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"img{i}.png"} for i in range(6)],
        "annotations": [{"id": 1, "image_id": 3, "bbox": [1, 2, 30, 20], "category_id": 1}],
        "categories": [{"id": 1, "name": "sign"}]}))
    _cli(["ground", str(src), "-o", str(tmp_path / "cli"), "--detector", "annotations", "--annotations", str(coco),
          "--workers", "1", "--shard-size", "2", "--db", str(tmp_path / "c.duckdb")])

    ds = ray.data.read_images(str(src), include_paths=True, mode="RGB").sort("path")
    ds = ds.map_batches(Grounding, fn_constructor_kwargs={"root": str(src), "detector": "annotations",
                                                          "annotations": str(coco)},
                        compute=ray.data.ActorPoolStrategy(size=1), batch_size=4)
    ds.repartition(3).write_datasink(ShardSink(tmp_path / "lib"))

    assert _tars(tmp_path / "lib") == _tars(tmp_path / "cli") and len(_tars(tmp_path / "cli")) == 3
    labels = [json.loads(s.read_text())["count"] for s in sorted((tmp_path / "lib").glob("*_stats.json"))]
    assert labels == [2, 2, 2]


def test_rows_without_an_image_or_a_name_are_one_clear_error():
    from blip3.datagen.ray import Annotate
    from tests.test_datagen_pipeline import SizeCaptioner

    annotate = Annotate(SizeCaptioner)
    with pytest.raises(ValueError, match="no image column"):
        annotate({"path": ["a.png"]})
    with pytest.raises(ValueError, match="`path`, `key` or `__key__`"):
        annotate({"bytes": [png_bytes(render(RENDERED[0]))]})
    table = annotate({"bytes": [b"not an image"], "key": ["x/y"]})
    assert table.to_pylist()[0]["status"] == "failed" and table.to_pylist()[0]["error_message"].startswith("decode:")
