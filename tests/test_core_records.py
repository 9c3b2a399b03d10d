"""core.records: the one home of the sample record types (validate, texts, images, sidecar row),
and where grounding objects live."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import duckdb
import pytest

from blip3.core.catalog import SOURCE_KINDS, Catalog
from blip3.core.records import (RECORD_KINDS, RecordError, grounding_objects, ocr_entries, record_kind,
                                sidecar_row)
from blip3.core.shards import iter_shard
from blip3.mixture.sources import add_source
from blip3.mixture.tokens import TokenCounter
from tests.mixture_fixtures import tiny_sources  # noqa: F401

GOOD = {
    "caption": ({"caption": "a red circle"}, {"jpg": b"x" * 10}, None),
    "interleaved": ({"texts": ["intro", None, "outro"], "images": [None, "0.jpg", None]}, {"0.jpg": b"x" * 7}, None),
    "sft": ({"conversations": [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A cat."}],
             "images": ["0.jpg"]}, {"0.jpg": b"x" * 5}, None),
    "dpo": ({"prompt": "<image>\nWhat?", "chosen": "A cat.", "rejected": "A dog.", "images": ["0.jpg"]},
            {"0.jpg": b"x" * 3}, None),
}


def test_every_catalog_kind_has_a_record_type():
    assert SOURCE_KINDS == tuple(RECORD_KINDS) == ("caption", "interleaved", "sft", "dpo")


@pytest.mark.parametrize("kind", list(GOOD))
def test_each_kind_validates_its_samples_and_names_its_images(kind):
    rec, members, txt = GOOD[kind]
    record_kind(kind).validate(rec, members)
    assert record_kind(kind).image_names(rec, members) == sorted(members)
    with pytest.raises(RecordError, match="absent from the tar" if kind != "caption" else "needs an image"):
        record_kind(kind).validate(rec, {})


@pytest.mark.parametrize("kind, rec, reason", [
    ("interleaved", {"texts": ["a"], "images": []}, "lists of equal length"),
    ("sft", {"conversations": [{"role": "user"}]}, "conversations"),
    ("dpo", {"prompt": "p", "chosen": "c"}, "'rejected'"),
])
def test_a_record_of_the_wrong_shape_is_refused_with_its_reason(kind, rec, reason):
    with pytest.raises(RecordError, match=reason):
        record_kind(kind).validate(rec, {"0.jpg": b""})


def test_texts_each_kind_contributes():
    assert record_kind("caption").texts({"caption": "json"}, "the txt") == ["the txt"]
    assert record_kind("caption").texts({"caption": "json caption"}, None) == ["json caption"]
    assert record_kind("interleaved").texts(*GOOD["interleaved"][::2]) == ["intro", "outro"]
    assert record_kind("sft").texts(*GOOD["sft"][::2]) == ["<image>\nWhat?", "A cat."]
    assert record_kind("dpo").texts(*GOOD["dpo"][::2]) == ["<image>\nWhat?", "A cat.", "A dog."]
    counter = TokenCounter(vision_tokens_per_crop=16)
    assert counter.sample("caption", {"caption": "abcdefgh"}, None, 1) == 2 + 16  # 8 bytes / 4 + one image


def test_grounding_objects_live_in_metadata_and_card_shaped_records_still_read():
    obj = {"label": "dog", "bbox": [0.1, 0.1, 0.5, 0.5], "score": 0.9}
    assert grounding_objects({"metadata": {"objects": [obj]}}) == [obj]
    assert grounding_objects({"objects": [obj]}) == [obj]  # the public card's shape
    assert grounding_objects({"metadata": {"objects": []}, "objects": [obj]}) == []  # metadata decides
    assert grounding_objects({"metadata": "junk", "objects": "junk"}) == []
    assert ocr_entries({"metadata": {"entries": [{"text": "A"}, 3]}}) == [{"text": "A"}]


def test_sidecar_row_is_derived_from_the_record():
    rec = {"uid": 7, "width": 96, "height": 64, "captions": [{}, {}],
           "metadata": {"entries": [{"confidence": 0.5}], "objects": [{"score": 1.0}]}}
    row = sidecar_row("caption", "k", rec, {"jpg": b"x" * 11, "json": b"{}"}, "hello")
    assert (row.uid, row.width, row.height, row.image_bytes, row.caption_length) == ("7", 96, 64, 11, 5)
    assert (row.n_captions, row.n_ocr, row.n_objects, row.mean_confidence) == (2, 1, 1, 0.75)
    assert sidecar_row("caption", "k", {}, {"jpg": b""}, None).caption_length is None
    assert sidecar_row("dpo", "k", *GOOD["dpo"][:2], None).caption_length == len("<image>\nWhat?A cat.A dog.")


def test_tiny_grounding_shards_keep_objects_in_metadata(tiny_sources):  # noqa: F811
    recs = [json.loads(s["json"]) for s in iter_shard(tiny_sources["caption-grounding"] / "00000.tar")]
    assert all("objects" not in r and "objects" in r["metadata"] for r in recs)
    assert sum(len(r["metadata"]["objects"]) for r in recs) > 0


def _card_shaped_tar(path: Path) -> Path:
    """A foreign caption tar in the public grounding card's shape (top-level `objects`), no sidecars."""
    with tarfile.open(path, "w") as tar:
        for i in range(3):
            rec = {"uid": f"u{i}", "objects": [{"label": "cat", "bbox": [0, 0, 1, 1], "score": 0.5}] * i}
            for ext, data in (("jpg", b"\xff\xd8 not decoded here"), ("txt", b"a cat"), ("json", json.dumps(rec).encode())):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_foreign_card_shaped_shards_are_catalogued_with_their_objects(tmp_path):
    folder = tmp_path / "card"
    folder.mkdir()
    _card_shaped_tar(folder / "part-0.tar")
    db = tmp_path / "c.duckdb"
    with Catalog(db) as cat:
        add_source(cat, "card", folder, "caption", TokenCounter())
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute("SELECT key, n_objects, caption_length, mean_confidence FROM samples ORDER BY key").fetchall()
    con.close()
    assert rows == [("s0", 0, 5, None), ("s1", 1, 5, 0.5), ("s2", 2, 5, 0.5)]
