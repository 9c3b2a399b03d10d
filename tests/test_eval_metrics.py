"""Benchmark metrics against their reference implementations' published cases."""

from __future__ import annotations

import pytest

from blip3.eval.metrics import (
    caption_scores,
    circular_accuracy,
    java_available,
    normalize_vqa_answer,
    parse_yes_no,
    pope_metrics,
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


def test_circular_accuracy_needs_every_rotation():
    results = [("q1", True), ("q1", True), ("q1", True), ("q2", True), ("q2", False), ("q3", False)]
    m = circular_accuracy(results)
    assert m["circular_accuracy"] == pytest.approx(1 / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)


CAPTIONS_REFS = {
    "1": ['A man says "hello" to a horse on the beach.', "A person cannot ride the U.S. horse along the shore."],
    "2": ["Two dogs are gonna play with a ball in the grass.", "A pair of dogs playing in a field with 1,000 flowers."],
    "3": ["A plate of food with broccoli and rice.", "Rice and broccoli on a white plate; it's Joe's dinner."],
}
CAPTIONS_PRED = {"1": 'A man riding a "U.S." horse on a beach.', "2": "Two dogs gonna play in 1,000 fields.",
                 "3": "A plate that cannot hold rice, broccoli and meat."}

needs_java = pytest.mark.skipif(not java_available(), reason="pycocoevalcap's tokenizer and METEOR run Java "
                                "(`make test` installs it)")


def _pycocoevalcap(refs, preds, *, meteor: bool):
    """The COCO caption evaluation's own pipeline, as pycocoevalcap's COCOEvalCap runs it."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in preds.items()})
    scores = {"BLEU-4": Bleu(4).compute_score(gts, res, verbose=0)[0][3], "CIDEr": Cider().compute_score(gts, res)[0]}
    if meteor:
        scorer = Meteor()
        try:
            scores["METEOR"], _ = scorer.compute_score(gts, res)
        finally:
            scorer.meteor_p.kill()
    return gts, scores


@pytest.mark.java
@needs_java
def test_cider_bleu_equal_pycocoevalcap_on_tricky_tokens():
    """Quotes, `cannot`, `gonna`, `U.S.`, `1,000`: where a regex tokenizer parts from the PTB one."""
    gts, ref = _pycocoevalcap(CAPTIONS_REFS, CAPTIONS_PRED, meteor=False)
    assert "can not" in gts["1"][1] and '"' not in gts["1"][0] and "1,000" in gts["2"][1]  # the PTB rules at work
    ours = caption_scores(CAPTIONS_REFS, CAPTIONS_PRED, meteor=False)
    assert set(ours) == {"BLEU-4", "CIDEr"}
    for k, v in ref.items():
        assert ours[k] == pytest.approx(v, rel=1e-6), k
    assert ours["CIDEr"] > 0.2 and ours["BLEU-4"] > 0  # the captions overlap: a scorer returning ~0 fails


@pytest.mark.slow
@pytest.mark.java
@needs_java
def test_meteor_equals_pycocoevalcap():
    _, ref = _pycocoevalcap(CAPTIONS_REFS, CAPTIONS_PRED, meteor=True)
    ours = caption_scores(CAPTIONS_REFS, CAPTIONS_PRED)
    assert ours["METEOR"] == pytest.approx(ref["METEOR"], rel=1e-6) and ours["METEOR"] > 0.1


def test_caption_scores_reject_missing_predictions():
    with pytest.raises(ValueError):
        caption_scores(CAPTIONS_REFS, {"1": "x"}, meteor=False)


def test_missing_java_is_one_line_naming_the_package(monkeypatch):
    import blip3.eval.metrics as m
    from blip3.core.errors import UserError

    monkeypatch.setattr(m.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="apt-get install default-jre-headless") as e:
        caption_scores(CAPTIONS_REFS, CAPTIONS_PRED, meteor=False)
    assert "\n" not in str(e.value)


def test_pope_metrics_equal_popes_evaluate_py(tmp_path):
    """POPE's own evaluate.py (vendored) on tricky answers: commas, several sentences, `Not`,
    `no.` inside words, empty answers."""
    import json
    import random

    from tests.vendor import run_pope_evaluate

    forms = ["Yes", "No", "yes, there is", "No, there is not.", "Not really.", "There is no dog. Yes", "I see a nose.",
             "", "not", "Yes. No.", "no,", "The answer is no", "Nope", "None of them. no", "It is NOT there."]
    rng = random.Random(2)
    preds = [rng.choice(forms) for _ in range(300)]
    labels = [rng.choice(["yes", "no"]) for _ in range(300)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"answer": p}) + "\n" for p in preds))
    (tmp_path / "l.jsonl").write_text("".join(json.dumps({"label": g}) + "\n" for g in labels))
    official = run_pope_evaluate(tmp_path / "a.jsonl", tmp_path / "l.jsonl")
    ours = pope_metrics(preds, labels)
    assert ours == pytest.approx({"accuracy": official["Accuracy"], "precision": official["Precision"],
                                  "recall": official["Recall"], "f1": official["F1 score"],
                                  "yes_ratio": official["Yes ratio"]}, abs=1e-12)
