"""OCR entries: pieces of one line that the detector split are merged at word gaps, and only there."""

from __future__ import annotations

from blip3.datagen.ocr_entries import RawText, build_entries


def box(x1: float, x2: float, y1: float = 20, y2: float = 60) -> list[list[float]]:
    return [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]


def texts(raw: list[RawText], width: int = 800, height: int = 200) -> list[str]:
    return [e["text"] for e in build_entries(raw, width, height)]


def test_overlapping_pieces_of_a_line_merge_with_one_space_and_no_repeated_letters():
    raw = [RawText(box(210, 400), "HVOLTAGE", 0.8), RawText(box(10, 230), "DANGER HIGH", 0.95)]
    (entry,) = build_entries(raw, 800, 200)
    assert entry["text"] == "DANGER HIGH VOLTAGE"
    assert entry["polygon"] == [[10.0, 20.0], [400.0, 20.0], [400.0, 60.0], [10.0, 60.0]]
    assert entry["bbox"] == [0.013, 0.1, 0.5, 0.3] and entry["confidence"] == 0.8


def test_pieces_a_word_gap_apart_merge_and_far_apart_stay_separate():
    assert texts([RawText(box(10, 100), "MAIN", 0.9), RawText(box(115, 250), "STREET", 0.9)]) == ["MAIN STREET"]
    # 150 px apart on a 40 px line: two signs side by side, not one line split
    assert texts([RawText(box(10, 100), "OPEN", 0.9), RawText(box(250, 400), "CLOSED", 0.9)]) == ["OPEN", "CLOSED"]


def test_a_slight_overlap_keeps_letters_that_only_look_repeated():
    # padded boxes overlap a little; the E of SALE and the E of EXIT are two letters
    assert texts([RawText(box(10, 100), "SALE", 0.9), RawText(box(95, 190), "EXIT", 0.9)]) == ["SALE EXIT"]


def test_lines_do_not_merge_across_lines_and_read_top_to_bottom():
    raw = [RawText(box(10, 200, 120, 160), "second line", 0.9), RawText(box(10, 200), "FIRST LINE", 0.9)]
    assert texts(raw) == ["FIRST LINE", "second line"]


def test_low_confidence_pieces_are_dropped_before_merging():
    raw = [RawText(box(10, 100), "MAIN", 0.9), RawText(box(105, 200), "STREET", 0.3)]
    assert texts(raw) == ["MAIN"]
