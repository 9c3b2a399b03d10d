"""Every caption/filter option of `blip3 ocr` and `blip3 ground` reaches the shards, through the
command on tiny real inputs (real OCR engine, real tiny Grounding DINO, local Ray).

One run per command sets every option away from its default at once; each assertion below fails
if its option is ignored (the defaults would give a different shard)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from blip3.cli import app
from blip3.core.shards import list_shards, read_sidecar
from blip3.datagen.detectors import DetectionLimits, box_area, filter_objects
from tests.grounding_fixtures import scenes, tiny_gdino  # noqa: F401  (fixtures)
from tests.ocr_fixtures import RENDERED, no_text_image, png_bytes, render

pytestmark = pytest.mark.slow

_SPEC = {s.name: s for s in RENDERED}
#: file name -> rendered sign (None: no text). Folder inputs are read in sorted order.
OCR_INPUTS = {"a_mack.png": "sign_mack", "b_open.png": "serif_open", "c_price.png": "price_tag",
              "d_blank.png": None, "e_library.png": "stix_italic"}


def _read(out: Path) -> tuple[dict, dict, list]:
    infos = list_shards(out)
    samples = {s["__key__"]: s for i in infos for s in wds.WebDataset(str(i.tar), shardshuffle=False)}
    rows = {r["key"]: r for i in infos for r in read_sidecar(i.parquet).to_pylist()}
    return samples, rows, infos


def _one(items: dict, prefix: str):
    (match,) = [v for k, v in items.items() if k.startswith(prefix)]
    return match


def test_ocr_options_reach_the_shards(ray_local, tmp_path):
    from blip3.datagen.inputs import InputSample
    from blip3.datagen.ocr import OcrConfig

    src = tmp_path / "in"
    src.mkdir()
    images = {name: (render(_SPEC[spec]) if spec else no_text_image()) for name, spec in OCR_INPUTS.items()}
    for name, img in images.items():
        (src / name).write_bytes(png_bytes(img))
    # precondition: the engine's confidences straddle the threshold, so ignoring it changes the result
    probe = OcrConfig(min_confidence=0.0)()
    probe.load()
    best = {n: max([e["confidence"] for e in probe.annotate(images[n], InputSample(n, b"", "png")).metadata["entries"]],
                   default=0.0) for n in ("a_mack.png", "b_open.png", "c_price.png")}
    weaker = max(best["a_mack.png"], best["b_open.png"])
    assert min(best["a_mack.png"], best["b_open.png"]) >= 0.5 and best["c_price.png"] - weaker > 0.004, best
    min_confidence = round((weaker + best["c_price.png"]) / 2, 4)  # the price tag passes, the other two do not

    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["ocr", str(src), str(out), "--workers", "1", "--db", str(tmp_path / "c.duckdb"),
                                 "--lead-in", "Pictured:", "--filler", "the sign", "--drop-empty",
                                 "--min-confidence", str(min_confidence), "--default-granularity", "0",
                                 "--limit", "4"])
    assert r.exit_code == 0, r.output
    samples, rows, infos = _read(out)

    # --limit 4: the fifth file is never read
    assert len(rows) == 4 and not any(k.startswith("e_library") for k in rows)
    # --min-confidence + --drop-empty: signs read below the threshold and the blank are failed no_text
    status = {k.split("_")[0]: (row["status"], (row["error_message"] or "").split(":")[0]) for k, row in rows.items()}
    assert status == {"a": ("failed", "no_text"), "b": ("failed", "no_text"), "c": ("success", ""),
                      "d": ("failed", "no_text")}
    # --lead-in, --filler, --default-granularity 0: the .txt is the bare quoted text
    price = _one(samples, "c_price")
    assert price["txt"].decode() == 'Pictured: the sign "Price: $12.99".'
    record = json.loads(price["json"])
    assert all(c["text"].startswith("Pictured: the sign ") for c in record["captions"] if c["granularity"] < 5)
    assert all(e["confidence"] >= min_confidence for e in record["metadata"]["entries"])
    gen = infos[0].generator
    assert (gen["min_confidence"], gen["default_granularity"], gen["lead_in"], gen["filler"], gen["keep_empty"]) == (
        min_confidence, 0, "Pictured:", "the sign", False)


# -- blip3 ground ----------------------------------------------------------------------------------
MIN_AREA = 0.09  # scene_000: red circle 0.100 kept, blue square 0.083 dropped; scene_001: 0.047 dropped


def test_ground_min_area_reaches_the_shards(scenes, ray_local, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["ground", str(scenes["images"]), str(out), "--detector", "annotations",
                                 "--annotations", str(scenes["coco"]), "--workers", "1", "--min-area", str(MIN_AREA),
                                 "--db", str(tmp_path / "c.duckdb")])
    assert r.exit_code == 0, r.output
    samples, _, infos = _read(out)
    labels = {k: [o["label"] for o in json.loads(s["json"])["metadata"]["objects"]] for k, s in samples.items()}
    assert labels["scene_000"] == ["red circle"]
    assert labels["scene_001"] == []
    assert infos[0].generator["min_area"] == MIN_AREA


#: The tiny random detector's boxes barely overlap: these values each change its kept set.
NMS_IOU, DET_MIN_AREA = 0.02, 0.005


def test_ground_nms_iou_and_min_area_reach_the_shards(scenes, tiny_gdino, ray_local, tmp_path):  # noqa: F811
    from blip3.datagen.detectors_gdino import HFGroundingDino

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("red circle\nblue square\nsky\n")
    image = Image.open(scenes["images"] / "scene_000.png").convert("RGB")
    det = HFGroundingDino(tiny_gdino)
    det.load()
    zero = DetectionLimits(box_threshold=0.0, text_threshold=0.0, max_objects=900)
    raw = det.detect(image, ["red circle", "blue square", "sky"], zero)
    expected = filter_objects(raw, replace(zero, nms_iou=NMS_IOU, min_area=DET_MIN_AREA))
    # precondition: either option left at its default keeps a different number of boxes
    assert len(filter_objects(raw, replace(zero, min_area=DET_MIN_AREA))) != len(expected)
    assert len(filter_objects(raw, replace(zero, nms_iou=NMS_IOU))) != len(expected)

    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["ground", str(scenes["images"]), str(out), "--model", str(tiny_gdino),
                                 "--tags", "vocab", "--vocab", str(vocab), "--box-threshold", "0.0",
                                 "--text-threshold", "0.0", "--max-objects", "900", "--nms-iou", str(NMS_IOU),
                                 "--min-area", str(DET_MIN_AREA), "--workers", "1",
                                 "--db", str(tmp_path / "c.duckdb")])
    assert r.exit_code == 0, r.output
    samples, rows, infos = _read(out)
    objs = json.loads(samples["scene_000"]["json"])["metadata"]["objects"]
    assert len(objs) == len(expected) and rows["scene_000"]["n_objects"] == len(expected)
    assert all(box_area(o["bbox"]) >= DET_MIN_AREA - 1e-3 for o in objs)
    assert (infos[0].generator["nms_iou"], infos[0].generator["min_area"]) == (NMS_IOU, DET_MIN_AREA)
