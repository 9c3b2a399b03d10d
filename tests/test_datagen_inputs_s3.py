"""Every input kind reads the same on a local path and on an object store (a real S3-compatible
server, moto's server mode on 127.0.0.1): the same refs in the same order, the same bytes."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from blip3.core.storage import Location
from blip3.datagen.inputs import INPUT_FORMATS, detect_format, iter_refs, load_sample
from tests.ocr_fixtures import jpeg_bytes, png_bytes, text_image
from tests.test_datagen_inputs import _tar
from tests.test_storage_s3 import BUCKET, s3_server  # noqa: F401 - the fixture


def _inputs(root):
    """One input of each kind under `root`: {kind: relative path}."""
    img, png = jpeg_bytes(text_image("A")), png_bytes(text_image("B"))
    (root / "folder" / "sub").mkdir(parents=True)
    (root / "folder" / "a.jpg").write_bytes(img)
    (root / "folder" / "a.txt").write_text("alt of a\n")
    (root / "folder" / "sub" / "b.png").write_bytes(png)
    (root / "folder" / "empty.png").write_bytes(b"")
    (root / "wds").mkdir()
    _tar(root / "wds" / "s-000.tar", [("k.jpg", img), ("k.txt", b"cap"), ("k.b.png", png)])
    _tar(root / "wds" / "s-001.tar", [("m.png", png), ("m.json", json.dumps({"uid": "u"}).encode())])
    (root / "i2d").mkdir()
    _tar(root / "i2d" / "00000.tar", [("000000000.jpg", img), ("000000000.txt", b"cap")])
    pq.write_table(pa.Table.from_pylist([
        {"key": "000000001", "url": "http://h/1", "caption": None, "status": "failed_to_download",
         "error_message": "HTTP Error 404", "uid": "u1"},
        {"key": "000000000", "url": "http://h/0", "caption": "zero", "status": "success", "error_message": None,
         "uid": "u0"}]), root / "i2d" / "00000.parquet")
    (root / "urls.jsonl").write_text('{"url": "http://127.0.0.1:9/a.jpg", "caption": "c"}\n{"url": "ftp://x/b"}\n')
    pq.write_table(pa.Table.from_pylist([{"uid": "o1", "url": "http://127.0.0.1:9/o.jpg", "captions": "[]",
                                          "metadata": "{}"}]), root / "ocr.parquet")
    return {"folder": "folder", "webdataset": "wds/s-{000..001}.tar", "img2dataset": "i2d", "urls": "urls.jsonl",
            "blip3-ocr": "ocr.parquet"}


def _seen(refs):
    return [(r.key, r.ext, r.uid, r.url, r.source_caption, r.error,
             load_sample(r).image if r.locator[0] == "at" else None) for r in refs]


def test_each_input_kind_reads_alike_on_the_store(s3_server, tmp_path):  # noqa: F811
    kinds = _inputs(tmp_path / "in")
    store = Location(f"s3://{BUCKET}/{tmp_path.name}", s3_server)
    store.put_tree(tmp_path / "in")
    assert sorted(kinds) == sorted(INPUT_FORMATS)
    for kind, rel in kinds.items():
        local, remote = str(tmp_path / "in" / rel), f"{store.url}/{rel}"
        assert detect_format(local) == detect_format(remote, s3_server) == kind, kind
        seen = _seen(iter_refs(local))
        assert seen and _seen(iter_refs(remote, storage_options=s3_server)) == seen, kind
    folder = _seen(iter_refs(tmp_path / "in" / "folder"))
    assert len(folder) == 3 and folder[0][4] == "alt of a" and folder[1][5] is None  # read: zero bytes, decided later
