"""BLIP3-OCR caption templates: the paper's golden example, the 12 variants, round-trip properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blip3.datagen.ocr_captions import (
    GRANULARITIES, CaptionStyle, build_captions, format_entry, ocr_sentence, parse_sentence, with_source,
)
from blip3.datagen.ocr_entries import RawText, build_entries, polygon_to_bbox

MACK = {"text": "MACK SHOP", "bbox": [0.192, 0.037, 0.817, 0.203]}
GOLDEN = {
    0: '"MACK SHOP"',
    1: '"MACK SHOP" located above the center',
    2: '"MACK SHOP" located at 2/17 of the image from top to bottom and 1/2 of the image from left to right',
    3: '"MACK SHOP" approximately starts at [0.2, 0.0] and extends up to [0.8, 0.2]',
    4: '"MACK SHOP" starts at [0.192, 0.037] and extends up to [0.817, 0.203]',
    5: "<ocr>MACK SHOP</ocr><bbox>[0.192, 0.037][0.817, 0.203]</bbox>",
}


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_golden_example_from_the_paper(granularity):
    assert format_entry(MACK["text"], MACK["bbox"], granularity) == GOLDEN[granularity]


def test_sentence_lead_in_filler_and_source_caption():
    assert ocr_sentence([MACK], 4) == f"The image contains the text {GOLDEN[4]}."
    assert ocr_sentence([MACK], 5) == f"The image contains {GOLDEN[5]}."  # token spans carry no filler
    stripped = CaptionStyle(lead_in="Text in the image:", filler="")
    assert ocr_sentence([MACK, MACK], 0, stripped) == f"Text in the image: {GOLDEN[0]}, {GOLDEN[0]}."
    assert with_source("a shop front", "S.") == "a shop front. S."
    assert with_source("Is it open?", "S.") == "Is it open? S."
    assert with_source("  ", "S.") == "S."


def test_twelve_variants_and_no_text_policy():
    caps = build_captions([MACK], "a shop front")
    assert [(c["granularity"], c["include_datacomp_raw_cap"]) for c in caps] == (
        [(g, False) for g in GRANULARITIES] + [(g, True) for g in GRANULARITIES])
    assert caps[4]["text"] == f"The image contains the text {GOLDEN[4]}."
    assert caps[10]["text"] == f"a shop front. The image contains the text {GOLDEN[4]}."
    empty = build_captions([], "a dog")
    assert {c["text"] for c in empty if not c["include_datacomp_raw_cap"]} == {"The image contains no text."}
    assert {c["text"] for c in empty if c["include_datacomp_raw_cap"]} == {"a dog. The image contains no text."}
    # without a source caption both halves are identical, so every image has all 12 variants
    no_src = build_captions([MACK], None)
    assert [c["text"] for c in no_src[:6]] == [c["text"] for c in no_src[6:]]


def test_grid_positions_and_fractions():
    assert format_entry("a", [0.0, 0.0, 0.1, 0.1], 1) == '"a" located at the top left'
    assert format_entry("a", [0.4, 0.4, 0.6, 0.6], 1) == '"a" located in the center'
    assert format_entry("a", [0.9, 0.9, 1.0, 1.0], 1) == '"a" located at the bottom right'
    assert format_entry("a", [0.0, 0.4, 0.2, 0.6], 1) == '"a" located to the left of the center'
    assert format_entry("a", [0.0, 0.0, 0.0, 0.0], 2) == '"a" located at 0 of the image from top to bottom and 0 of the image from left to right'
    with pytest.raises(ValueError):
        format_entry("a", [0, 0, 1, 1], 6)


def test_entries_filter_order_and_boxes():
    raw = [
        RawText([[300, 110], [380, 110], [380, 140], [300, 140]], "world", 0.95),
        RawText([[10, 12], [90, 12], [90, 40], [10, 40]], "top", 0.99),
        RawText([[100, 105], [200, 108], [200, 142], [100, 139]], "hello", 0.90),  # same line, slanted
        RawText([[0, 200], [50, 200], [50, 220], [0, 220]], "faint", 0.2),
        RawText([[0, 230], [50, 230], [50, 250], [0, 250]], "   ", 0.99),
        RawText([[-20, 250], [420, 250], [420, 320], [-20, 320]], "wide  spaced", 0.8),
    ]
    entries = build_entries(raw, 400, 300, min_confidence=0.5)
    assert [e["text"] for e in entries] == ["top", "hello", "world", "wide spaced"]
    assert entries[0]["bbox"] == [0.025, 0.04, 0.225, 0.133]
    assert entries[-1]["bbox"] == [0.0, 0.833, 1.0, 1.0]  # clamped to the image
    assert entries[0]["polygon"] == [[10.0, 12.0], [90.0, 12.0], [90.0, 40.0], [10.0, 40.0]]
    assert build_entries(raw, 400, 300, min_confidence=0.85)[-1]["text"] == "world"


coord = st.floats(min_value=-500, max_value=3000, allow_nan=False, allow_infinity=False)
polygons = st.lists(st.tuples(coord, coord), min_size=4, max_size=4)
texts = st.text(st.characters(blacklist_characters='"<>', blacklist_categories=("Cs", "Cc", "Zl", "Zp")),
                min_size=1, max_size=20).filter(lambda t: t.strip() and t == " ".join(t.split()))


@settings(max_examples=150, deadline=None)
@given(polygons, st.integers(1, 2000), st.integers(1, 2000))
def test_boxes_are_normalised_and_ordered(polygon, width, height):
    x1, y1, x2, y2 = polygon_to_bbox(polygon, width, height)
    assert 0.0 <= x1 <= x2 <= 1.0 and 0.0 <= y1 <= y2 <= 1.0
    assert all(round(v, 3) == v for v in (x1, y1, x2, y2))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(texts, polygons, st.floats(0.5, 1.0)), min_size=1, max_size=5),
       st.integers(8, 2000), st.integers(8, 2000), st.sampled_from(["the text", ""]))
def test_captions_parse_back_to_the_same_text_and_box(items, width, height, filler):
    entries = build_entries([RawText(p, t, c) for t, p, c in items], width, height, min_confidence=0.5)
    style = CaptionStyle(filler=filler)
    for e in entries:
        x1, y1, x2, y2 = e["bbox"]
        assert 0.0 <= x1 <= x2 <= 1.0 and 0.0 <= y1 <= y2 <= 1.0
    for g in (3, 4, 5):
        parsed = parse_sentence(ocr_sentence(entries, g, style), g)
        assert [t for t, _ in parsed] == [e["text"] for e in entries]
        digits = 1 if g == 3 else 3
        assert [b for _, b in parsed] == [[round(v, digits) for v in e["bbox"]] for e in entries]
    for g in (0, 1, 2):  # no box, but the text still reads back from between the quotes
        sentence = ocr_sentence(entries, g, style)
        assert all(f'"{e["text"]}"' in sentence for e in entries)


def test_build_captions_builds_each_granularity_sentence_once(monkeypatch):
    import blip3.datagen.ocr_captions as oc

    calls: list[int] = []
    real = oc.ocr_sentence
    monkeypatch.setattr(oc, "ocr_sentence", lambda entries, g, style: calls.append(g) or real(entries, g, style))
    caps = oc.build_captions([{"text": "HI", "bbox": [0.1, 0.2, 0.3, 0.4]}], "alt text", oc.CaptionStyle())
    assert sorted(calls) == sorted(oc.GRANULARITIES)
    assert [c["text"] for c in caps[len(calls):]] == [oc.with_source("alt text", c["text"]) for c in caps[:len(calls)]]
