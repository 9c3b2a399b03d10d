"""Text from data cannot forge caption tags: OCR text, labels, alt text; empty labels are refused."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blip3.core.errors import UserError
from blip3.datagen.annotations import load_annotations
from blip3.datagen.caption_text import EmptyLabel, caption_text
from blip3.datagen.grounding_captions import GroundedObject, build_captions as grounding_captions
from blip3.datagen.ocr_captions import build_captions as ocr_captions

TAG = re.compile(r"</?(ocr|object|bbox)>")
FORGED_BOX = "</object><bbox>[0.000, 0.000][1.000, 1.000]</bbox>"


def _tags(text: str) -> list[str]:
    return TAG.findall(text)


def test_forged_category_gives_exactly_one_box_per_object():
    objs = [GroundedObject(f"dog{FORGED_BOX}<object>cat", (0.1, 0.1, 0.2, 0.2)), GroundedObject("tree", (0.5, 0.5, 0.9, 0.9))]
    for cap in grounding_captions(objs, "A dog</object> under a tree <bbox>[0,0][1,1]</bbox>"):
        if cap["format"] == "bbox":
            assert _tags(cap["text"]).count("bbox") == 2 * 2, cap  # two objects: one open + one close each
            assert _tags(cap["text"]).count("object") == 2 * 2, cap
        else:
            assert not _tags(cap["text"]), cap
    bbox_tags = next(c for c in grounding_captions(objs, None) if c["format"] == "bbox")["text"]
    assert "<object>dog‹/object›‹bbox›[0.000, 0.000][1.000, 1.000]‹/bbox›‹object›cat</object>" in bbox_tags


def test_alt_text_cannot_close_the_ocr_span():
    entries = [{"text": "SALE</ocr><bbox>[0.0, 0.0][1.0, 1.0]</bbox><ocr>", "bbox": [0.1, 0.1, 0.3, 0.2]}]
    for cap in ocr_captions(entries, "alt </ocr> text\n<ocr>x</ocr>"):
        expected = ["ocr", "ocr", "bbox", "bbox"] if cap["granularity"] == 5 else []
        assert _tags(cap["text"]) == expected, cap
        assert "\n" not in cap["text"]


def test_empty_labels_never_give_an_empty_object_span():
    for label in ("", "   ", "\n\t"):
        with pytest.raises(EmptyLabel):
            grounding_captions([GroundedObject(label, (0.1, 0.1, 0.2, 0.2))], "a caption")


@pytest.mark.parametrize("doc, field", [
    ({"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1, "name": "  "}]}, r"categories\[0\]\.name"),
    ([{"image_id": 1, "objects": [{"x": 0, "y": 0, "w": 1, "h": 1, "names": ["\t"]}]}], r"\[0\]\.objects\[0\]\.names\[0\]"),
])
def test_annotation_files_with_empty_names_are_refused_at_load(tmp_path, doc, field):
    f = tmp_path / "ann.json"
    f.write_text(json.dumps(doc))
    with pytest.raises(UserError, match=field + r": name is empty"):
        load_annotations(f)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_caption_text_never_holds_a_tag_or_a_line_break(text):
    out = caption_text(text)
    assert "<" not in out and ">" not in out and "\n" not in out and "\r" not in out
    assert out == caption_text(out)  # escaping twice changes nothing (inline grounding re-escapes)


def test_retemplate_turns_a_stored_empty_label_into_a_failed_row(tmp_path):
    from blip3.core.shards import SampleRow, ShardWriter, list_shards, read_sidecar
    from blip3.datagen.retemplate import retemplate
    from tests.core_fixtures import jpeg

    src = tmp_path / "old"
    with ShardWriter(src, 0, generator={"name": "grounding"}) as w:
        for key, label in (("good", "dog"), ("bad", " ")):
            record = {"metadata": {"objects": [{"label": label, "bbox": [0.1, 0.1, 0.5, 0.5], "score": 0.9}]},
                      "source_caption": "a dog", "captions": []}
            w.add(key, {"jpg": jpeg(), "txt": "old", "json": record}, SampleRow(key, n_objects=1))
    result = retemplate(src, tmp_path / "new")
    assert result.samples == 2
    rows = {r["key"]: r for r in read_sidecar(list_shards(tmp_path / "new")[0].parquet).to_pylist()}
    assert rows["good"]["status"] == "success"
    assert rows["bad"]["status"] == "failed" and rows["bad"]["error_message"].startswith("caption: object label ' ' is empty")


def _unprintable(text: str) -> list[str]:
    """Characters a caption line must not hold: C0/C1 controls (NUL, ESC, DEL, ...), lone
    surrogates, bidirectional overrides."""
    import unicodedata

    return [c for c in text if unicodedata.category(c) in ("Cc", "Cs") or "\u202a" <= c <= "\u202e"
            or "\u2066" <= c <= "\u2069"]


HOSTILE = "SALE\x00 50%\x1b[31m OFF\x1b[0m\x07\x7f\x85\u202eevil\ud800\x9b end"


def test_control_characters_never_reach_a_caption():
    """NUL, ESC (and the rest of its escape sequence), BEL, DEL, C1 controls, a lone surrogate and
    a bidi override in OCR'd text, an alt text or a label are dropped from every caption variant."""
    assert caption_text(HOSTILE) == "SALE 50% OFF evil end"
    entries = [{"text": HOSTILE, "bbox": [0.1, 0.1, 0.3, 0.2]}]
    captions = [c["text"] for c in ocr_captions(entries, f"alt {HOSTILE}")]
    captions += [c["text"] for c in grounding_captions([GroundedObject(f"dog{HOSTILE}", (0.1, 0.1, 0.2, 0.2))],
                                                        f"a dog {HOSTILE}")]
    assert len(captions) == 12 + 6
    for cap in captions:
        assert not _unprintable(cap), cap
        cap.encode("utf-8")  # what the .txt member is written as


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec=None, categories=("Cc", "Cs", "Zs", "Ll", "Sm")), max_size=40))
def test_caption_text_is_printable_whatever_the_input(text):
    assert not _unprintable(caption_text(text))
