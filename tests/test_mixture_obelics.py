"""OBELICS-shaped parquet -> interleaved shards -> catalog -> loader, through the real parts."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from blip3.cli import app
from blip3.core.sql import run_query
from blip3.mixture.build import build_manifest
from blip3.mixture.loader import MixtureLoader


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), color).save(buf, format="PNG")
    return buf.getvalue()


def test_import_obelics_mixed_paths_and_bytes(tmp_path):
    # paths and bytes in one column: arrow needs one type, so use the HF Image struct {bytes, path}
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "imgs" / "blue.jpg")
    texts = [["Intro text.", None, "After the image."], [None, "Caption only."], ["bad", None], ["both set"],
             ["Remote.", None], [None, "x"], ["unequal", None]]
    images = [[None, {"bytes": None, "path": "imgs/blue.jpg"}, None], [{"bytes": _png((255, 0, 0)), "path": None}, None],
              [None, {"bytes": None, "path": "imgs/nope.jpg"}], [{"bytes": None, "path": "imgs/blue.jpg"}],
              [None, {"bytes": None, "path": "https://example.com/a.jpg"}], [{"bytes": b"not an image", "path": None}, None],
              [None]]
    src = tmp_path / "obelics.parquet"
    pq.write_table(pa.table({"texts": pa.array(texts, pa.list_(pa.string())), "images": pa.array(images, pa.list_(struct))}), src)
    out, db = tmp_path / "shards", tmp_path / "cat.duckdb"
    r = CliRunner().invoke(app, ["source", "import-obelics", str(src), str(out), "--shard-size", "4",
                                 "--source", "obelics", "--db", str(db)])
    assert r.exit_code == 0, r.output

    docs = list(wds.WebDataset([str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False))
    assert len(docs) == 2
    first = json.loads(docs[0]["json"])
    assert first["texts"] == ["Intro text.", None, "After the image."] and first["images"] == [None, "img0.jpg", None]
    assert Image.open(io.BytesIO(docs[0]["img0.jpg"])).size == (16, 16)
    assert json.loads(docs[1]["json"])["images"] == ["img0.png", None]

    rows = run_query("SELECT reason, n FROM v_failures WHERE source = 'obelics'", db).to_pylist()
    reasons = {d["reason"]: d["n"] for d in rows}
    assert reasons == {"image_missing": 1, "format": 2, "image_url": 1, "decode": 1}

    m = build_manifest({"name": "o", "sources": [{"name": "obelics", "weight": 1}]}, db=db)
    samples = MixtureLoader(m).take(4)
    assert {s["kind"] for s in samples} == {"interleaved"} and all(s["images"] for s in samples)


def test_import_obelics_plain_path_column(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "imgs" / "a.png")
    src = tmp_path / "paths.parquet"
    pq.write_table(pa.table({"texts": [["Hello", None]], "images": [[None, "imgs/a.png"]], "id": ["doc/1"]}), src)
    from blip3.mixture.obelics import import_obelics

    r = import_obelics(src, tmp_path / "out")
    assert (r.documents, r.failed, r.shards) == (1, 0, 1)
    doc = next(iter(wds.WebDataset(str(tmp_path / "out" / "00000.tar"), shardshuffle=False)))
    assert json.loads(doc["json"])["uid"] == "doc/1" and "img0.png" in doc


def test_import_obelics_counts_a_duplicate_id_as_failed(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "imgs" / "a.png")
    src = tmp_path / "dup.parquet"
    pq.write_table(pa.table({"texts": [["One", None], ["Two", None]], "images": [[None, "imgs/a.png"]] * 2,
                             "id": ["doc-1", "doc-1"]}), src)
    from blip3.mixture.obelics import import_obelics

    r = import_obelics(src, tmp_path / "out")
    assert (r.documents, r.failed, r.shards, r.reasons) == (1, 1, 1, {"duplicate key": 1})
    docs = list(wds.WebDataset(str(tmp_path / "out" / "00000.tar"), shardshuffle=False))
    assert [json.loads(d["json"])["texts"] for d in docs] == [["One", None]]
