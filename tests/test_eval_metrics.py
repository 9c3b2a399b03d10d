"""Benchmark metrics against their reference implementations' published cases."""

from __future__ import annotations

import pytest

from blip3.eval.metrics import (
    caption_scores,
    circular_accuracy,
    java_available,
    normalize_vqa_answer,
    parse_choice,
    parse_yes_no,
    pope_metrics,
    ptb_tokenize,
    vqa_accuracy,
)


@pytest.mark.parametrize("raw, normalised", [
    # The cases the VQA evaluation page lists: number words, articles, contractions, punctuation.
    ("two", "2"), ("none", "0"), ("A dog", "dog"), ("the red car", "red car"), ("dont", "don't"),
    ("Yes.", "yes"), ("1,000", "1000"), ("3.5", "3.5"), ("left-hand", "left hand"), ("tea / coffee", "tea coffee"),
    ("  what's\tthat?\n", "what's that"), ("an apple", "apple"), ("isnt", "isn't"),
])
def test_vqa_normalisation(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(matches, expected):
    """min(#humans/3, 1) averaged over the 10 subsets of 9 annotators: 0.3 / 0.6 / 0.9 / 1.0."""
    answers = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa_accuracy("2", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_only_when_humans_disagree():
    """The current official rule (tests/test_eval_vqa_official.py runs the script itself)."""
    assert vqa_accuracy(" dog\n", ["dog"] * 10) == pytest.approx(1.0)
    assert vqa_accuracy("The Dog.", ["dog"] * 10) == 0.0
    # Humans disagree: everyone is normalised ("hot-dog" -> "hot dog", "Two" -> "2").
    assert vqa_accuracy("hot dog", ["hot-dog"] * 3 + ["sandwich"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("Two", ["2"] * 3 + ["two"] * 7) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


@pytest.mark.parametrize("text, parsed", [
    ("Yes, there is a dog in the image.", "yes"), ("No.", "no"), ("There is not a cat.", "no"),
    ("yes", "yes"), ("No, there is no car", "no"), ("I see a dog. No cat though", "yes"), ("", "yes"),
])
def test_pope_parsing(text, parsed):
    """The POPE script: first sentence only; "no"/"No"/"not" anywhere in it means no."""
    assert parse_yes_no(text) == parsed


def test_pope_metrics_by_hand():
    labels = ["yes", "yes", "yes", "no", "no", "no", "no", "yes"]
    preds = ["Yes.", "yes", "No, it is not.", "yes", "no", "No", "There is no bus.", "Yes"]
    # TP=3 (0,1,7) FN=1 (2) FP=1 (3) TN=3 (4,5,6)
    m = pope_metrics(preds, labels)
    assert m == pytest.approx({"accuracy": 6 / 8, "precision": 3 / 4, "recall": 3 / 4, "f1": 3 / 4, "yes_ratio": 4 / 8})
    always_yes = pope_metrics(["yes"] * 4, ["yes", "no", "no", "yes"])
    assert always_yes["accuracy"] == 0.5 and always_yes["yes_ratio"] == 1.0 and always_yes["recall"] == 1.0


def test_choice_parsing():
    opts = {"A": "a cat", "B": "a dog", "C": "a bird"}
    assert parse_choice("B", opts) == "B"
    assert parse_choice("(C) a bird", opts) == "C"
    assert parse_choice("A. a cat", opts) == "A"
    assert parse_choice("The answer is B.", opts) == "B"
    assert parse_choice("a dog", opts) == "B"
    assert parse_choice("A lovely animal", opts) is None  # a word starting with A is not option A
    assert parse_choice("D", opts) is None


def test_circular_accuracy_needs_every_rotation():
    results = [("q1", True), ("q1", True), ("q1", True), ("q2", True), ("q2", False), ("q3", False)]
    m = circular_accuracy(results)
    assert m["circular_accuracy"] == pytest.approx(1 / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)


CAPTIONS_REFS = {
    "1": ["A man is riding a horse on the beach.", "A person rides a brown horse along the shore."],
    "2": ["Two dogs play with a ball in the grass.", "A pair of dogs playing in a field."],
    "3": ["A plate of food with broccoli and rice.", "Rice and broccoli on a white plate."],
}
CAPTIONS_PRED = {"1": "A man riding a horse on a beach.", "2": "Two dogs playing in the grass.",
                 "3": "A plate with rice, broccoli and meat."}


@pytest.mark.skipif(not java_available(), reason="pycocoevalcap's PTBTokenizer runs Java")
def test_cider_and_bleu_equal_pycocoevalcap():
    """Our Java-free tokenisation + scorers give pycocoevalcap's numbers (its PTBTokenizer)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in CAPTIONS_REFS.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in CAPTIONS_PRED.items()})
    for k in gts:
        assert [ptb_tokenize(c) for c in CAPTIONS_REFS[k]] == gts[k]
    ref_cider, _ = Cider().compute_score(gts, res)
    ref_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    ours = caption_scores(CAPTIONS_REFS, CAPTIONS_PRED, meteor=False)
    assert ours["CIDEr"] == pytest.approx(ref_cider, abs=1e-9)
    assert ours["BLEU-4"] == pytest.approx(ref_bleu[3], abs=1e-9)
    assert ours["CIDEr"] > 0.5  # the captions are close: a broken scorer that returns ~0 fails


def test_ptb_tokenize_matches_stanford_on_common_forms():
    assert ptb_tokenize("A dog's ball isn't red, it's BLUE.") == "a dog 's ball is n't red it 's blue"


def test_caption_scores_reject_missing_predictions():
    with pytest.raises(ValueError):
        caption_scores(CAPTIONS_REFS, {"1": "x"}, meteor=False)


@pytest.mark.slow
@pytest.mark.skipif(not java_available(), reason="METEOR's reference implementation is Java")
def test_meteor_runs_the_reference_jar():
    scores = caption_scores(CAPTIONS_REFS, CAPTIONS_PRED, meteor=True)
    assert 0.2 < scores["METEOR"] < 1.0
