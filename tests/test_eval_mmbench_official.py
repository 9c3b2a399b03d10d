"""MMBench scoring against VLMEvalKit's own code (vendored in tests/vendor/vlmevalkit with its
Apache-2.0 licence): its answer extraction, and its circular evaluation (`mcq_circular_eval`,
exact-matching policy) run on the published file layout written here."""

from __future__ import annotations

import inspect
import random

import pandas as pd
import pytest

from blip3.eval import vlmevalkit_matching as ours
from blip3.core.errors import UserError
from blip3.eval.tasks import get_task
from tests.eval_fixtures import write_mmbench
from tests.vendor import HERE, load_module


@pytest.fixture(scope="module")
def vlmevalkit():
    return load_module(HERE / "vlmevalkit" / "multiple_choice.py", "vendored_vlmevalkit_multiple_choice")


def test_runtime_matcher_is_vlmevalkits_code():
    upstream = load_module(HERE / "vlmevalkit" / "matching_util.py", "vendored_vlmevalkit_matching_util")
    for name in ("can_infer_option", "can_infer_text", "can_infer"):
        assert inspect.getsource(getattr(ours, name)) == inspect.getsource(getattr(upstream, name)), name
    assert ours._VERBOSE_ANSWER_RE.pattern == upstream._VERBOSE_ANSWER_RE.pattern


@pytest.mark.parametrize("answer, letter", [
    ("Answer: A", "A"), ("Option D", "D"), ("The correct answer is **D**.", "D"), ("yes (A)", "A"), ("(C) a bird", "C"),
    ("dog", "B"), ("a dog, surely", "B"), ("I cannot determine the answer", False), ("Cannot determine the answer", "Z"),
])
def test_vlmevalkit_exact_matching_reads_the_issue_cases(answer, letter):
    assert ours.can_infer(answer, {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}) == letter


PREDICTIONS = ["{gold}", "Answer: {gold}", "The correct answer is **{gold}**.", "Option {gold}", "({gold})", "{text}",
               "A", "B", "no idea", "{gold} or {wrong}", "I think {text}", "Cannot determine the answer"]


def test_circular_accuracy_equals_vlmevalkit_on_its_file_layout(tmp_path, vlmevalkit):
    """A TSV in MMBench_DEV_EN.tsv's layout (passes as rows i + k * 1e6, images by reference),
    mixed predictions per pass: our circular accuracy, per question, equals mcq_circular_eval's."""
    path = tmp_path / "mmbench" / "mmbench_dev_en.tsv"
    write_mmbench(path, 40)
    task = get_task("mmbench")
    items = task.load(tmp_path, "test")
    assert all(it.error is None for it in items) and len({it.target["group"] for it in items}) == 40
    rng = random.Random(3)
    answers = {}
    for it in items:
        gold = it.target["answer"]
        wrong = next(k for k in it.target["options"] if k != gold)
        form = PREDICTIONS[0] if rng.random() < 0.6 else rng.choice(PREDICTIONS)  # most passes right: groups hit
        answers[it.id] = form.format(gold=gold, wrong=wrong, text=it.target["options"][gold])

    meta = pd.read_csv(path, sep="\t")  # VLMEvalKit's load of a .tsv
    data = meta.copy()
    data["prediction"] = [answers[str(i)] for i in meta["index"]]
    result = vlmevalkit.mcq_circular_eval(None, data, meta, 1, "result.pkl", "MMBench_DEV_EN")
    official = dict(zip(result["index"].astype(str), result["hit"]))

    ours_per_q = {}
    for it in items:
        ours_per_q.setdefault(it.target["group"], []).append(task.score_item(it, answers[it.id]) == 1.0)
    assert {g: int(all(v)) for g, v in ours_per_q.items()} == official
    m = task.score(items, answers)
    assert m["circular_accuracy"] == pytest.approx(sum(official.values()) / len(official))
    assert 0 < m["circular_accuracy"] < 1  # the draw has both hits and misses


def test_broken_rows_are_failed_rows_not_tracebacks(tmp_path):
    path = tmp_path / "mmbench" / "mmbench_dev_en.tsv"
    write_mmbench(path, 5)
    lines = path.read_text().splitlines()
    head = lines[0].split("\t")
    short = "\t".join(lines[1].split("\t")[:4])  # missing cells
    no_index = "\t".join([""] + lines[5].split("\t")[1:])
    bad_answer = "\t".join(c if k != head.index("answer") else "Q" for k, c in enumerate(lines[10].split("\t")))
    orphan = "3000003" + lines[11][1:]  # a pass (with its own image) whose main row 3 is absent
    path.write_text("\n".join([lines[0], short, *lines[2:5], no_index, *lines[6:10], bad_answer, orphan, *lines[12:]])
                    + "\n")
    items = get_task("mmbench").load(tmp_path, "test")
    errors = [it.error for it in items if it.error]
    assert any("cells" in e for e in errors) and any("not an integer" in e for e in errors)
    assert any("not one of the options" in e for e in errors)
    # questions 0, 1 and 3 have lost their main rows: their passes form no question; question 2
    # lost its last pass, so its other passes are not scored either
    assert any("has no row of its own" in e for e in errors) and any("another pass of question 2" in e for e in errors)
    assert {it.target["group"] for it in items if it.error is None} == {"4"}


@pytest.mark.parametrize("name, rel", [("ai2d", "ai2d/AI2D_TEST.tsv"), ("scienceqa", "scienceqa/ScienceQA_TEST.tsv"),
                                       ("seedbench", "seedbench/SEEDBench_IMG.tsv")])
def test_plain_multiple_choice_equals_vlmevalkits_vanilla_eval(tmp_path, vlmevalkit, name, rel):
    """AI2D, ScienceQA-img, SEED-Bench image: VLMEvalKit's TSVs, no circular passes; accuracy per
    row equal to mcq_vanilla_eval (exact matching), options from 2 to 5, some cells missing."""
    import base64
    import csv
    import io

    from tests.model_fixtures import noise_image

    path = tmp_path / rel
    path.parent.mkdir(parents=True)
    buf = io.BytesIO()
    noise_image(40, 32, 1).save(buf, format="JPEG")
    rng = random.Random(5)
    words = ["red", "blue", "green", "a cat", "two", "None", "north", "the sun"]
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "hint", "A", "B", "C", "D", "E", "answer", "category", "image", "split"])
        for i in range(60):
            k = rng.randint(2, 5)
            opts = rng.sample(words, k) + [""] * (5 - k)
            valid = [c for c, o in zip("ABCDE", opts) if o not in ("", "None")]
            w.writerow([100 + i, f"Which one {i}?", rng.choice(["nan", "A diagram."]), *opts, rng.choice(valid),
                        "science", base64.b64encode(buf.getvalue()).decode() if i == 0 else "100", "test"])
    task = get_task(name)
    items = task.load(tmp_path, "test")
    assert len(items) == 60 and all(it.error is None for it in items)
    answers = {}
    for it in items:
        gold = it.target["answer"]
        wrong = next((k for k in it.target["options"] if k != gold), gold)
        form = rng.choice(PREDICTIONS)
        answers[it.id] = form.format(gold=gold, wrong=wrong, text=it.target["options"][gold])
    meta = pd.read_csv(path, sep="\t")
    data = meta.copy()
    data["prediction"] = [answers[str(i)] for i in meta["index"]]
    result = vlmevalkit.mcq_vanilla_eval(None, data, meta, 1, f"{name}.pkl", name)
    official = dict(zip(result["index"].astype(str), result["hit"]))
    assert {it.id: int(task.score_item(it, answers[it.id])) for it in items} == official
    assert task.score(items, answers)["accuracy"] == pytest.approx(sum(official.values()) / 60)
    assert 0 < sum(official.values()) < 60


@pytest.mark.parametrize("name, rel, method", [("chartqa", "chartqa/ChartQA_TEST.tsv", "relaxed_accuracy"),
                                               ("docvqa", "docvqa/DocVQA_VAL.tsv", "anls")])
def test_open_answers_equal_vlmevalkits_process_line(tmp_path, name, rel, method):
    """ChartQA (relaxed accuracy) and DocVQA (ANLS) per question, against VLMEvalKit's own
    process_line + hit_calculate (vendored), with one answer or a list literal of several."""
    import base64
    import csv
    import io

    from tests.model_fixtures import noise_image

    vqa_eval = load_module(HERE / "vlmevalkit" / "vqa_eval.py", "vendored_vlmevalkit_vqa_eval")
    dataset = {"chartqa": "ChartQA_TEST", "docvqa": "DocVQA_VAL"}[name]
    path = tmp_path / rel
    path.parent.mkdir(parents=True)
    buf = io.BytesIO()
    noise_image(40, 32, 2).save(buf, format="JPEG")
    rng = random.Random(9)
    gold = ["12", "12.5", "13%", "0", "-4", "Yes", "New York", "1,000", "Total Revenue", "3.14", "  spaced  out "]
    preds = gold + ["12.6", "12.2", "0.13", "13", "yes", "new york", "New Yrok", "1000", "total revenues", "", "3.3", "Yes ", " New York"]
    rows, answers = [], {}
    for i in range(80):
        given = rng.sample(gold, rng.choice([1, 1, 2, 3]))
        rows.append([i, f"What is shown {i}?", given[0] if len(given) == 1 else repr(given),
                     base64.b64encode(buf.getvalue()).decode() if i == 0 else "0", "test"])
        answers[str(i)] = rng.choice(preds)
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "answer", "image", "split"])
        w.writerows(rows)
    task = get_task(name)
    items = task.load(tmp_path, "test")
    assert len(items) == 80 and all(it.error is None for it in items)
    meta = pd.read_csv(path, sep="\t")
    lines = [dict(meta.iloc[k], prediction=answers[str(meta["index"][k])], answer=str(meta["answer"][k]))
             for k in range(len(meta))]
    official = vqa_eval.hit_calculate([vqa_eval.process_line(x, method=method) for x in lines], dataset)
    ours = [task.score_item(it, answers[it.id]) for it in items]
    assert ours == pytest.approx([float(x) for x in official], abs=1e-12)
    assert 0 < sum(ours) < 80
    assert task.prompt(items[0], []).text == "<image>\nWhat is shown 0?\nAnswer the question using a single word or phrase."


def test_ocrbench_equals_vlmevalkits_evaluate(tmp_path):
    """OCRBench's substring rule (case-insensitive; spaces ignored for handwritten formulas) and
    its Final Score, against VLMEvalKit's OCRBench.evaluate (vendored)."""
    import base64
    import csv
    import io

    from tests.model_fixtures import noise_image

    official_cls = load_module(HERE / "vlmevalkit" / "ocrbench.py", "vendored_vlmevalkit_ocrbench").OCRBench
    path = tmp_path / "ocrbench" / "OCRBench.tsv"
    path.parent.mkdir(parents=True)
    buf = io.BytesIO()
    noise_image(40, 32, 3).save(buf, format="JPEG")
    rng = random.Random(4)
    cats = ["Regular Text Recognition", "Scene Text-centric VQA", "Doc-oriented VQA", "Key Information Extraction",
            "Handwritten Mathematical Expression Recognition", "Digit String Recognition"]
    gold = ["STOP", "x^{2} + 1", "Coca Cola", "2024-01-05", "$ 12.50", "a\nb"]
    preds = ["the sign says stop", "x^{2}+1", "X^{2} + 1", "coca cola", "Coca-Cola", "2024-01-05.", "$12.50", "$ 12.50 total",
             "a b", "A\nB", "", "nothing"]
    rows, answers = [], {}
    for i in range(90):
        given = rng.sample(gold, rng.choice([1, 2]))
        rows.append([i, f"What is written {i}?", repr(given), rng.choice(cats),
                     base64.b64encode(buf.getvalue()).decode() if i == 0 else "0"])
        answers[str(i)] = rng.choice(preds)
    rows[1][2:4] = [repr(["x^{2} + 1"]), cats[4]]  # a formula: spaces do not count
    answers["1"] = "x^{2}+1"
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "answer", "category", "image"])
        w.writerows(rows)
    task = get_task("ocrbench")
    items = task.load(tmp_path, "test")
    assert len(items) == 90 and all(it.error is None for it in items)
    data = pd.read_csv(path, sep="\t")
    data["prediction"] = [answers[str(i)] for i in data["index"]]
    official = official_cls.evaluate(data)
    ours = task.score(items, answers)
    assert ours["final_score"] == official["Final Score"] and 0 < ours["final_score"] < 90
    formulas = sum(task.score_item(it, answers[it.id]) for it in items if it.target["category"] == cats[4])
    assert formulas == official["Handwritten Mathematical Expression Recognition"] > 0
    assert task.prompt(items[0], []).text == "<image>\nWhat is written 0?"


def test_mme_equals_vlmevalkits_rating(tmp_path):
    """MME: YOrN_Extraction, accuracy + accuracy+ per category over image pairs, perception and
    reasoning sums, against VLMEvalKit's MME_rating (vendored)."""
    import base64
    import csv
    import io

    from blip3.eval.tasks import MME
    from tests.model_fixtures import noise_image

    vendored = load_module(HERE / "vlmevalkit" / "mme.py", "vendored_vlmevalkit_mme")
    path = tmp_path / "mme" / "MME.tsv"
    path.parent.mkdir(parents=True)
    buf = io.BytesIO()
    noise_image(40, 32, 5).save(buf, format="JPEG")
    rng = random.Random(6)
    preds = ["Yes", "No", "yes.", "No, it is not.", "Yes and no", "I cannot tell", "YES!", "no", "Yes, there is one."]
    rows, answers = [], {}
    for c, cat in enumerate(MME.PERCEPTION + MME.REASONING):
        for p in range(3):
            for k, gold in enumerate(["Yes", "No"]):
                i = 100 * c + 2 * p + k
                rows.append([i, f"Is it so {i}? Please answer yes or no.", gold, cat, f"{cat}/{p}.jpg",
                             base64.b64encode(buf.getvalue()).decode() if i == 0 else "0"])
                answers[str(i)] = rng.choice(preds)
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "answer", "category", "image_path", "image"])
        w.writerows(rows)
    task = get_task("mme")
    items = task.load(tmp_path, "test")
    assert len(items) == len(rows) and all(it.error is None for it in items)
    data = pd.read_csv(path, sep="\t")
    data["prediction"] = [answers[str(i)] for i in data["index"]]
    # ImageYORNDataset.evaluate: the extracted answer against the gold one, then MME_rating
    data["score"] = [vendored.YOrN_Extraction(p) == a for p, a in zip(data["prediction"], data["answer"])]
    official = vendored.MME_rating(data).iloc[0].to_dict()
    ours = task.score(items, answers)
    for key in ("perception", "reasoning", *MME.PERCEPTION, *MME.REASONING):
        assert ours[key] == pytest.approx(official[key], abs=1e-9), key
    assert 0 < ours["perception"] < 2000
    assert task.prompt(items[0], []).text == "<image>\nIs it so 0? Please answer yes or no."


def test_mmmu_equals_vlmevalkit_with_open_questions_and_image_markers(tmp_path, vlmevalkit):
    """MMMU_DEV_VAL.tsv's layout: several images (a list literal), `<image k>` markers, open
    questions (no options) that MMMU_preproc turns into A = the answer, B = "Other Answers"."""
    import base64
    import csv
    import io

    from tests.model_fixtures import noise_image

    def b64(seed):
        buf = io.BytesIO()
        noise_image(40 + seed, 32, seed).save(buf, format="JPEG")
        return base64.b64encode(buf.getvalue()).decode()

    path = tmp_path / "mmmu" / "MMMU_DEV_VAL.tsv"
    path.parent.mkdir(parents=True)
    rng = random.Random(8)
    rows, answers = [], {}
    for i in range(40):
        open_q = i % 3 == 0
        opts = ["", "", "", ""] if open_q else ["12 cm", "15 cm", "<image 1>", "none of these"]
        gold = "42" if open_q else rng.choice("ABCD")
        images = repr([b64(1), b64(2)]) if i == 0 else b64(3)
        rows.append([i, f"Look at <image 1> and tell {i}." if i == 0 else f"What is {i}?", *opts, gold,
                     images, rng.choice(["dev", "validation"])])
        answers[str(i)] = rng.choice(["42", "The answer is 42", "A", "B", "(C)", "15 cm", "no idea", "Other Answers"])
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "A", "B", "C", "D", "answer", "image", "split"])
        w.writerows(rows)
    task = get_task("mmmu")
    items = task.load(tmp_path, "test")
    assert len(items) == 40 and all(it.error is None for it in items)
    p = task.prompt(items[0], [])  # the image where the text says <image 1>, one image only
    assert p.text == "Question: Look at <image> and tell 0.\n" and [im.size for im in p.images] == [(41, 32)]
    p = task.prompt(items[1], [])  # a marker in an option: the image goes there, not first
    assert p.text.startswith("Question: What is 1?\nOptions:\nA. 12 cm\nB. 15 cm\nC. <image>\nD. none of these\n")
    assert [im.size for im in p.images] == [(43, 32)]
    items[1].target["images"] = []  # a marker without its image: that question fails, as one line
    with pytest.raises(UserError, match="<image 1> but 0 images"):
        task.prompt(items[1], [])
    meta = pd.read_csv(path, sep="\t")
    data = meta.copy()
    data["prediction"] = [answers[str(i)] for i in meta["index"]]
    result = vlmevalkit.mcq_vanilla_eval(None, data, meta, 1, "mmmu.pkl", "MMMU_DEV_VAL")
    official = dict(zip(result["index"].astype(str), result["hit"]))
    assert {it.id: int(task.score_item(it, answers[it.id])) for it in items} == official
    m = task.score(items, answers)
    val = [official[it.id] for it in items if it.target["split"] == "validation"]
    assert m["accuracy"] == pytest.approx(sum(val) / len(val)) and "dev/accuracy" in m
