"""VQA accuracy, question by question, against the official scripts themselves (vendored in
tests/vendor with their licences): GT-Vision-Lab's current vqaEval.py, and OpenFlamingo's port
for the `openflamingo` protocol."""

from __future__ import annotations

import random

import pytest

from blip3.eval.metrics import MAX_VQA_ANSWERS, normalize_vqa_answer, vqa_accuracy
from tests.vendor import load_open_flamingo_vqa, load_vqa_eval

TRICKY = ["2", "two", "Two", "TWO", "2.", "the dog", "dog", "Dog.", "a dog", "1,000", "1000", "1 000", "3.5", "3. 5",
          "dont", "don't", "Don't", "yes", "Yes", "yes.", "hot-dog", "hot dog", "hotdog", "(x)", "x", " x ", "tea / coffee",
          "tea coffee", "isnt", "isn't", "none", "0", "zero", "an apple", "apple", "e.g.", "eg", "U.S.", "us", "left\tside",
          "left side", "it's", "its", "10", "ten", "?", "", "yes" + "." * 40, "yes" + "." * 8, "a.b.c." * 7]


class _Store:
    """The two attributes of the official `VQA` helper that `VQAEval` reads."""

    def __init__(self, qa: dict):
        self.qa = qa

    def getQuesIds(self):  # noqa: N802  (the official API's name)
        return list(self.qa)


def _official(module, cases: list[tuple[str, list[str]]]) -> list[float]:
    """Per-question accuracy from the official VQAEval (in [0, 1], 10 decimals)."""
    gts = {q: {"question_id": q, "question_type": "what", "answer_type": "other",
               "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)]}
           for q, (_, answers) in enumerate(cases)}
    res = {q: {"question_id": q, "answer": pred} for q, (pred, _) in enumerate(cases)}
    ev = module.VQAEval(_Store(gts), _Store(res), n=10)
    ev.evaluate()
    return [ev.evalQA[q] / 100 for q in range(len(cases))]


@pytest.fixture(scope="module")
def official():
    return load_vqa_eval()


@pytest.mark.parametrize("pred, answers, expected", [
    ("Two", ["2"] * 10, 0.0),  # humans agree: the prediction is only stripped
    ("two", ["2"] * 10, 0.0),
    (" 2\n", ["2"] * 10, 1.0),
    ("2", ["two"] * 3 + ["three"] * 7, 0.9),  # humans disagree: everyone is normalised
    ("Two", ["2"] * 6 + ["3"] * 4, 1.0),
    ("yes" + "." * 40, ["yes" + "." * 8] * 5 + ["no"] * 5, 0.0),  # only 32 periods are stripped
    ("yes" + "." * 20, ["yes" + "." * 8] * 5 + ["no"] * 5, 1.0),
])
def test_issue_cases_equal_the_official_script(official, pred, answers, expected):
    assert _official(official, [(pred, answers)]) == [pytest.approx(expected, abs=1e-9)]
    assert vqa_accuracy(pred, answers) == pytest.approx(expected, abs=1e-9)


def test_every_question_equals_the_official_script_on_tricky_answers(official):
    rng = random.Random(7)
    cases = []
    for _ in range(400):
        pool = rng.sample(TRICKY, rng.choice([1, 2, 3, 5]))
        answers = [rng.choice(pool) for _ in range(10)]
        pred = rng.choice(pool + rng.sample(TRICKY, 2))
        cases.append((pred, answers))
    cases += [(p, [p] * 10) for p in TRICKY] + [(p, [normalize_vqa_answer(p)] * 10) for p in TRICKY]
    ours = [vqa_accuracy(p, a) for p, a in cases]
    assert ours == pytest.approx(_official(official, cases), abs=1e-9)
    assert len({round(x, 3) for x in ours}) >= 4  # the draw covers 0, partial and full credit


def test_openflamingo_port_normalises_always(official):
    """OpenFlamingo's vqa_metric.py (the `openflamingo` protocol) normalises prediction and
    answers whether or not the humans agree."""
    of = load_open_flamingo_vqa()
    rng = random.Random(11)
    cases = [(rng.choice(TRICKY), [rng.choice(TRICKY[:12]) for _ in range(10)]) for _ in range(200)]
    cases += [("Two", ["2"] * 10)]
    ours = [vqa_accuracy(p, a, always_normalise=True) for p, a in cases]
    assert ours == pytest.approx(_official(of, cases), abs=1e-9)
    assert ours[-1] == 1.0 and vqa_accuracy("Two", ["2"] * 10) == 0.0


def test_a_long_answer_list_is_scored_by_counting():
    """30,000 answers (the issue's case, minutes with the official quadratic loop) score as the
    leave-one-out rule says; a task refuses lists above MAX_VQA_ANSWERS before this is reached."""
    assert vqa_accuracy("two", ["2"] * 15_000 + ["3"] * 15_000) == 1.0
    assert vqa_accuracy("2", ["2"] * 2 + ["3"] * 29_998) == pytest.approx(2 * (1 / 3) / 30_000 + 29_998 * (2 / 3) / 30_000)
    assert 10 <= MAX_VQA_ANSWERS < 30_000


def test_vizwiz_records_without_ids_equal_open_flamingos_scorer(tmp_path):
    """VizWiz answer records carry an answer and a confidence but no id: OpenFlamingo's scorer
    leaves out every record equal to the annotator's. Per question equal to its vqa_metric.py,
    on published-layout files (many "unanswerable"), read by the vizwiz task."""
    import json

    from blip3.core.errors import UserError
    from blip3.eval.protocols import OFFICIAL, OPENFLAMINGO
    from blip3.eval.runner import plan_task
    from blip3.eval.tasks import get_task

    of = load_open_flamingo_vqa()
    rng = random.Random(12)
    pool = ["unanswerable", "Unanswerable", "unsuitable", "blue", "dark blue", "2", "two", "yes"]
    rows = [{"image": f"VizWiz_val_{i:08d}.jpg", "question": f"What is this {i}?", "answerable": 1,
             "answer_type": "other", "answers": [{"answer": rng.choice(pool[:rng.choice([2, 4, 8])]),
                                                  "answer_confidence": rng.choice(["yes", "maybe", "no"])}
                                                 for _ in range(10)]} for i in range(150)]
    (tmp_path / "vizwiz").mkdir()
    (tmp_path / "vizwiz" / "val.json").write_text(json.dumps(rows))
    task = get_task("vizwiz", OPENFLAMINGO)
    items = task.load(tmp_path, "test")
    preds = {it.id: rng.choice(pool) for it in items}
    gts = {k: {"question_id": k, "question_type": "other", "answers": [dict(a) for a in r["answers"]]}
           for k, r in enumerate(rows)}
    res = {k: {"question_id": k, "answer": preds[str(k)]} for k in range(len(rows))}
    ev = of.VQAEval(_Store(gts), _Store(res), n=10)
    ev.evaluate()
    ours = [task.score_item(it, preds[it.id]) for it in items]
    assert ours == pytest.approx([ev.evalQA[k] / 100 for k in range(len(rows))], abs=1e-9)
    plain = [vqa_accuracy(preds[it.id], it.target["answers"], always_normalise=True) for it in items]
    assert plain != pytest.approx(ours, abs=1e-9)  # the leave-out rule matters on these files
    with pytest.raises(UserError, match="vizwiz is defined under --protocol openflamingo"):
        plan_task("vizwiz", OFFICIAL, tmp_path, 0, None, 0)


def test_textvqa_equals_its_m4c_evaluator():
    """TextVQA under the official protocol: per question equal to TextVQAAccuracyEvaluator
    (LLaVA's copy of the m4c evaluator, vendored), whose normalisation differs from the VQA
    script's (commas, `?` and `'s`, always normalised)."""
    from blip3.eval.metrics import textvqa_accuracy
    from tests.vendor import HERE, load_module

    m4c = load_module(HERE / "llava" / "m4c_evaluator.py", "vendored_llava_m4c_evaluator").TextVQAAccuracyEvaluator()
    rng = random.Random(13)
    extra = ["John's", "johns", "john 's", "Coca-Cola", "coca cola", "1,000", "1000", "what?", "what", "NOKIA", "nokia."]
    for _ in range(300):
        pool = rng.sample(TRICKY + extra, rng.choice([1, 2, 3, 5]))
        answers = [rng.choice(pool) for _ in range(10)]
        pred = rng.choice(pool + rng.sample(TRICKY + extra, 2))
        expected = m4c.eval_pred_list([{"pred_answer": pred, "gt_answers": answers}])
        assert textvqa_accuracy(pred, answers) == pytest.approx(expected, abs=1e-12), (pred, answers)
    assert textvqa_accuracy("Two", ["2"] * 10) == 1.0 and vqa_accuracy("Two", ["2"] * 10) == 0.0
    assert textvqa_accuracy("john's", ["John's"] * 5 + ["x"] * 5) == 1.0
    from blip3.eval.tasks import Item, get_task

    item = Item("q", lambda: None, "q", {"answers": ["John's"] * 10})
    assert get_task("textvqa").score_item(item, "john's") == 1.0  # m4c, not the VQA script (0.0)
    assert get_task("vqav2").score_item(item, "john's") == 0.0
