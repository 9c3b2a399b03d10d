"""COCO / Visual Genome boxes as grounding: the parser, and the whole path through `blip3 ground`."""

import json

import pytest
import webdataset as wds
from typer.testing import CliRunner

from blip3.cli import app
from blip3.core.errors import UserError
from blip3.core.keys import sanitize_key
from blip3.core.shards import list_shards, read_sidecar
from blip3.core.sql import run_query
from blip3.datagen.annotations import load_annotations
from tests.grounding_fixtures import scenes  # noqa: F401  (fixtures)

RED = (0.075, 0.167, 0.375, 0.5)  # (12, 20, 48x40) on 160x120
BLUE = (0.625, 0.5, 0.875, 0.833)  # (100, 60, 40x40)


def test_coco_parse(scenes):  # noqa: F811
    idx = load_annotations(scenes["coco"])
    assert idx.kind == "coco"
    s0 = idx.lookup(["images/scene_000.png"])
    assert s0 is not None and s0.skipped_crowd == 1
    objs = s0.objects(999, 999)  # the file's own size (160x120) wins over the decoded one
    assert [(o.label, o.bbox) for o in objs] == [("red circle", RED), ("blue square", BLUE)]
    assert idx.lookup(["scene_002"]).boxes == []
    assert idx.lookup(["100"]) is s0  # by image id
    assert idx.lookup(["unlisted_003.png", None]) is None
    with_crowd = load_annotations(scenes["coco"], include_crowd=True).lookup(["scene_000"])
    assert len(with_crowd.boxes) == 3 and with_crowd.skipped_crowd == 0


def test_visual_genome_parse(tmp_path):
    vg = tmp_path / "objects.json"
    vg.write_text(json.dumps([
        {"image_id": 1, "image_url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg",
         "objects": [{"object_id": 5, "x": 0, "y": 0, "w": 400, "h": 300, "names": ["Tree  Trunk"]},
                     {"object_id": 6, "x": 200, "y": 150, "w": 200, "h": 150, "name": "man"}]},
        {"image_id": 2, "objects": []},
    ]))
    idx = load_annotations(vg)
    assert idx.kind == "vg"
    objs = idx.lookup(["1.jpg"]).objects(800, 600)  # VG has no size here: the image's is used
    assert [(o.label, o.bbox) for o in objs] == [("tree trunk", (0.0, 0.0, 0.5, 0.5)), ("man", (0.25, 0.25, 0.5, 0.5))]
    assert idx.lookup(["images/2.jpg"]).boxes == []


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ('{"foo": 1}', "neither COCO"),
        ('{"images": [{"file_name": "a.jpg"}], "annotations": [], "categories": []}', r"images\[0\]"),
        ('{"images": [{"id": 1}], "annotations": [{"image_id": 2, "bbox": [0,0,1,1], "category_id": 1}], '
         '"categories": [{"id": 1, "name": "x"}]}', r"annotations\[0\]\.image_id"),
        ('{"images": [{"id": 1}], "annotations": [{"image_id": 1, "bbox": [0,0,1], "category_id": 1}], '
         '"categories": [{"id": 1, "name": "x"}]}', r"annotations\[0\]\.bbox"),
        ('{"images": [{"id": 1}], "annotations": [{"image_id": 1, "bbox": [0,0,1,1], "category_id": 3}], '
         '"categories": [{"id": 1, "name": "x"}]}', r"annotations\[0\]\.category_id"),
        ('[{"image_id": 1, "objects": [{"x": 0, "y": 0, "w": "a", "h": 1, "names": ["x"]}]}]',
         r"\[0\]\.objects\[0\]\.w"),
        ('{"images": {"id": 1}, "annotations": [], "categories": []}', r"images: must be a list, got dict"),
        ('{"images": 7, "annotations": [], "categories": []}', r"images: must be a list, got int"),
        ('{"images": [], "annotations": {}, "categories": []}', r"annotations: must be a list"),
        ('{"images": [{"id": 1, "width": -640, "height": 480}], "annotations": [], "categories": []}',
         r"images\[0\]\.width: expected a number > 0, got -640"),
        ('{"images": [{"id": 1, "width": "640", "height": 480}], "annotations": [], "categories": []}',
         r"images\[0\]\.width: expected a number, got '640'"),
        ('{"images": [{"id": 1, "width": 0, "height": 480}], "annotations": [], "categories": []}',
         r"images\[0\]\.width: expected a number > 0"),
        ('{"images": [{"id": 1}], "annotations": [{"image_id": 1, "bbox": [NaN,0,1,1], "category_id": 1}], '
         '"categories": [{"id": 1, "name": "x"}]}', r"annotations\[0\]\.bbox: expected a finite number, got nan"),
        ('{"images": [{"id": 1}], "annotations": [{"image_id": 1, "bbox": [0,0,-5,1], "category_id": 1}], '
         '"categories": [{"id": 1, "name": "x"}]}', r"annotations\[0\]\.bbox: expected a number >= 0, got -5"),
        ('[{"image_id": 1, "objects": ["tree"]}]', r"\[0\]\.objects\[0\]: each object must be a JSON object, got str"),
        ('[{"image_id": 1, "width": "wide", "objects": []}]', r"\[0\]\.width: expected a number"),
        ('[{"image_id": 1, "objects": [{"x": Infinity, "y": 0, "w": 1, "h": 1, "names": ["x"]}]}]',
         r"\[0\]\.objects\[0\]\.x: expected a finite number"),
    ],
)
def test_malformed_files_name_the_field(tmp_path, content, match):
    f = tmp_path / "ann.json"
    f.write_text(content)
    with pytest.raises(UserError, match=match) as e:
        load_annotations(f)
    assert "ann.json" in str(e.value)


def test_duplicate_coco_image_id_fails_both_images_with_a_reason(tmp_path):
    from PIL import Image

    from blip3.datagen.annotator import SkipSample
    from blip3.datagen.grounding import make_config
    from blip3.datagen.inputs import InputSample

    f = tmp_path / "coco.json"
    f.write_text(json.dumps({
        "images": [{"id": 5, "file_name": "a.jpg"}, {"id": 6, "file_name": "c.jpg"}, {"id": 5, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 5, "bbox": [0, 0, 2, 2], "category_id": 1}],
        "categories": [{"id": 1, "name": "cat"}],
    }))
    idx = load_annotations(f)
    reason = "image id 5 is listed twice in coco.json (images[0] and images[2])"
    assert idx.lookup(["a.jpg"]).error == reason and idx.lookup(["b.jpg"]).error == reason
    assert idx.lookup(["c.jpg"]).error is None
    annotator = make_config(detector="annotations", annotations=f)()
    annotator.load()
    image = Image.new("RGB", (8, 8))
    with pytest.raises(SkipSample, match="annotations: image id 5 is listed twice"):
        annotator.annotate(image, InputSample(key="b", image=b"", ext="jpg", meta={"path": "b.jpg"}))
    assert annotator.annotate(image, InputSample(key="c", image=b"", ext="jpg", meta={"path": "c.jpg"})).n_objects == 0


def _read_back(out):
    samples = {}
    for info in list_shards(out):
        for s in wds.WebDataset(str(info.tar), shardshuffle=False).decode():
            samples[s["__key__"]] = s
    rows = {r["key"]: r for info in list_shards(out) for r in read_sidecar(info.parquet).to_pylist()}
    return samples, rows


@pytest.mark.slow
def test_coco_end_to_end_through_cli(scenes, tmp_path, ray_local):  # noqa: F811
    out, db = tmp_path / "out", tmp_path / "cat.duckdb"
    args = ["ground", str(scenes["images"]), str(out), "--detector", "annotations",
            "--annotations", str(scenes["coco"]), "--workers", "2", "--shard-size", "3", "--db", str(db)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    samples, rows = _read_back(out)
    odd = sanitize_key("more/été (1)")  # matched to its COCO entry by its relative path
    assert sorted(samples) == sorted([odd, "scene_000", "scene_001", "scene_002"])
    assert samples[odd]["json"]["metadata"]["objects"] == [
        {"label": "blue square", "bbox": [0.0, 0.0, 0.5, 0.5], "score": 1.0}]
    failed = {k: r["error_message"].split(":")[0] for k, r in rows.items() if r["status"] != "success"}
    assert failed == {"broken_004": "decode", "unlisted_003": "annotations"}

    s0 = samples["scene_000"]
    rec = s0["json"]
    assert rec["metadata"]["objects"] == [
        {"label": "red circle", "bbox": list(RED), "score": 1.0},
        {"label": "blue square", "bbox": list(BLUE), "score": 1.0},
    ]
    assert rec["metadata"]["skipped_crowd"] == 1 and rec["generator"]["detector"] == "annotations"
    assert s0["txt"] == ("A red circle (to the left of the center) next to a blue square (to the right of the center).")
    by_variant = {(c["format"], c["style"]): c["text"] for c in rec["captions"]}
    assert len(by_variant) == 6
    assert by_variant[("bbox", "tags")] == (
        "The image contains <object>red circle</object><bbox>[0.075, 0.167][0.375, 0.500]</bbox>, "
        "<object>blue square</object><bbox>[0.625, 0.500][0.875, 0.833]</bbox>")  # the paper's form: no period
    assert rows["scene_000"]["n_objects"] == 2 and rows["scene_000"]["n_captions"] == 6

    empty = samples["scene_002"]  # annotated with no boxes: kept, caption = source caption
    assert empty["json"]["metadata"]["objects"] == []
    assert {c["text"] for c in empty["json"]["captions"] if c["style"] == "tags"} == {"The image contains no objects"}
    assert empty["txt"] == "An empty white wall." and rows["scene_002"]["n_objects"] == 0

    # resumable: a second run skips both finished shards
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "0 shard(s) written, 2 skipped" in " ".join(again.output.split())

    # re-template without re-detecting: textual tag lists in reading order as .txt, objects untouched
    re_out = tmp_path / "retemplated"
    re_args = ["retemplate", str(out), str(re_out), "--caption-format", "textual", "--caption-style", "tags",
               "--lead-in", "Objects:", "--tag-order", "reading", "--db", str(db)]
    r = CliRunner().invoke(app, re_args)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, re_args)  # same options again: nothing to redo
    assert "0 shard(s) rewritten (0 rows), 2 already done" in " ".join(r.output.split())
    re_samples, re_rows = _read_back(re_out)
    assert re_samples["scene_000"]["txt"] == (
        "Objects: red circle (starts at [0.075, 0.167] and extends up to [0.375, 0.500]), "
        "blue square (starts at [0.625, 0.500] and extends up to [0.875, 0.833]).")
    assert re_samples["scene_000"]["jpg"] == samples["scene_000"]["jpg"]
    assert re_samples["scene_002"]["txt"] == "Objects: no objects."  # the no-object policy, re-templated
    # registered in the catalog as the engines' outputs are
    assert run_query("SELECT n_samples FROM sources WHERE name = 'retemplated'", db).column(0).to_pylist() == [
        sum(r["status"] == "success" for r in re_rows.values())]
    assert re_samples["scene_000"]["json"]["metadata"] == rec["metadata"]
    assert {k: r["status"] for k, r in re_rows.items()} == {k: r["status"] for k, r in rows.items()}


def test_retemplate_refuses_other_engines(tmp_path):
    from blip3.core.shards import SampleRow, ShardWriter
    from blip3.datagen.retemplate import retemplate

    with ShardWriter(tmp_path / "ocr", 0, generator={"name": "ocr"}) as w:
        w.add("k", {"txt": "x", "json": {}}, SampleRow("k"))
    with pytest.raises(UserError, match="generator.name"):
        retemplate(tmp_path / "ocr", tmp_path / "o2")
    with pytest.raises(UserError, match="must differ"):
        retemplate(tmp_path / "ocr", tmp_path / "ocr")


def test_drop_empty_policy_in_process(scenes):  # noqa: F811
    from PIL import Image

    from blip3.datagen.annotator import SkipSample
    from blip3.datagen.grounding import make_config
    from blip3.datagen.inputs import InputSample

    keep, drop = (make_config(detector="annotations", annotations=scenes["coco"], drop_empty=d)()
                  for d in (False, True))
    keep.load()
    drop.load()
    image = Image.open(scenes["images"] / "scene_002.png").convert("RGB")
    sample = InputSample(key="scene_002", image=b"", ext="png", source_caption="An empty white wall.",
                         meta={"path": "scene_002.png"})
    assert keep.annotate(image, sample).n_objects == 0
    with pytest.raises(SkipSample, match="no_objects"):
        drop.annotate(image, sample)


def test_malformed_annotations_fail_before_work(tmp_path, scenes):  # noqa: F811
    import subprocess
    import sys
    from pathlib import Path

    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [{"id": 1}], "annotations": [{"image_id": 1}], "categories": []}')
    r = subprocess.run([sys.executable, "-m", "blip3.cli", "ground", str(scenes["images"]), str(tmp_path / "o"),
                        "--detector", "annotations", "--annotations", str(bad)],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "bad.json: annotations[0]: each annotation needs image_id and bbox" in " ".join(r.stderr.split())
    assert not (tmp_path / "o").exists()
