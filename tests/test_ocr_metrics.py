"""OCR quality figures: glued words must show up as lost words, not as a small CER."""

from __future__ import annotations

import pytest

from blip3.datagen.ocr_metrics import OcrScore, edit_distance, score


def test_edit_distance_on_strings_and_word_lists():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "") == 3 and edit_distance("abc", "abc") == 0
    assert edit_distance("a b c".split(), "a c".split()) == 1


def test_glued_words_cost_little_cer_but_every_word():
    s = OcrScore().add("MAIN STREET STATION", "MAINSTREETSTATION")
    assert s.cer == pytest.approx(2 / 19) and s.cer_nospace == 0.0
    assert s.word_recall == 0.0 and s.word_precision == 0.0


def test_words_match_as_a_multiset_case_and_punctuation_kept():
    s = OcrScore().add("to be or not to be", "to be or not be")
    assert s.word_recall == pytest.approx(5 / 6) and s.word_precision == 1.0
    s = OcrScore().add("Price: $12.99", "price: $12.99")
    assert s.word_recall == 0.5  # case matters: captions teach the text as written


def test_rates_are_ratios_of_totals_and_whitespace_is_normalised():
    s = score([("ab", "ab"), ("abcdefgh", "abcdefgX"), ("  two   words ", "two words")])
    assert s.pairs == 3 and s.cer == pytest.approx(1 / 19) and s.word_recall == pytest.approx(3 / 4)
    assert s.summary() == {"pairs": 3, "cer": 0.0526, "cer_nospace": 0.0556, "word_recall": 0.75,
                           "word_precision": 0.75}
    assert OcrScore().summary()["word_recall"] == 1.0  # nothing to find, nothing missed
