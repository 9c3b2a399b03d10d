"""Benchmark files in their published layouts -> items, prompts, few-shot draws, limits, errors."""

from __future__ import annotations

import json
import shutil

import pytest

from blip3.core.errors import UserError
from blip3.eval.metrics import java_available
from blip3.eval.runner import limit_items, read_done
from blip3.eval.tasks import TASKS, Item, clean, draw_shots, get_task
from tests.eval_fixtures import benchmarks  # noqa: F401  (fixture)
from tests.test_cli_errors import blip3, one_line_error


@pytest.mark.parametrize("name, n", [("vqav2", 3), ("okvqa", 3), ("textvqa", 3), ("coco", 3), ("textcaps", 3),
                                     ("nocaps", 3), ("pope", 8), ("mmbench", 10)])
def test_every_layout_loads(benchmarks, name, n):
    items = get_task(name).load(benchmarks, "test")
    assert len(items) == n  # pope: 2 splits x 4; mmbench: one row per circular pass (4 + 3 + 3)
    assert all(it.image().size == (40, 32) for it in items[:2])


def test_vqa_prompt_is_the_few_shot_format_and_scores_officially(benchmarks):
    task = get_task("vqav2")
    items, train = task.load(benchmarks, "test"), task.load(benchmarks, "train")
    shots = draw_shots(train, items[0], 2, seed=0)
    p = task.prompt(items[0], shots)
    assert not p.chat and len(p.images) == 3
    assert p.text == ("".join(f"<image>Question:{s.question} Short answer:2<|endofchunk|>" for s in shots)
                      + "<image>Question:How many dogs are there 0? Short answer:")
    assert task.answer(" Two\nQuestion: what") == "Two"
    # The humans disagree, so everyone is normalised: "two" is "2" (6 of 10), "two dogs" is
    # "2 dogs" (2 of 10).
    assert task.score_item(items[0], "two") == 1.0
    assert task.score_item(items[0], "two dogs") == pytest.approx(0.6)
    assert task.score_item(items[0], "3") == pytest.approx(0.6)


def test_shots_are_deterministic_per_item_and_seed(benchmarks):
    task = get_task("textvqa")
    items, train = task.load(benchmarks, "test"), task.load(benchmarks, "train")
    a = [s.id for s in draw_shots(train, items[1], 4, seed=0)]
    assert a == [s.id for s in draw_shots(list(train), items[1], 4, seed=0)]
    assert len(set(a)) == 4 and set(a) <= {t.id for t in train}
    assert any([s.id for s in draw_shots(train, items[1], 4, seed=s)] != a for s in range(1, 5))
    assert draw_shots(train, items[1], 0, seed=0) == []
    with pytest.raises(UserError, match="8 train examples"):
        draw_shots(train[:3], items[1], 8, seed=0)


def test_mmbench_passes_are_the_files_rows_grouped_by_index_mod_1e6(benchmarks):
    """VLMEvalKit's layout: each circular pass is a row (index + k * 1e6), asked as written, its
    image cell naming the main row; not rotated again."""
    task = get_task("mmbench")
    items = task.load(benchmarks, "test")
    q0 = [it for it in items if it.target["group"] == "0"]
    assert [it.id for it in q0] == ["0", "1000000", "2000000", "3000000"]
    assert [it.target["answer"] for it in q0] == ["B", "A", "D", "C"]  # "dog" moves one letter up per pass
    assert [it.target["options"][it.target["answer"]] for it in q0] == ["dog"] * 4
    assert q0[1].image().size == (40, 32)  # the image of row 0
    p = task.prompt(q0[1], [])
    assert p.chat and p.text == ("<image>\nHint: A photo.\nQuestion: What animal is shown?\nOptions:\nA. dog\nB. bird\n"
                                 "C. fish\nD. cat\nPlease select the correct answer from the options above. \n")
    assert "Hint" not in task.prompt(items[-1], []).text  # "nan" is pandas' missing cell
    answers = {it.id: f"The correct answer is **{it.target['answer']}**." for it in items}
    answers["2000001"] = "Answer: A"  # one wrong pass sinks question 1
    m = task.score(items, answers)
    assert m["circular_accuracy"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx((len(items) - 1) / len(items))


def test_pope_scores_per_split(benchmarks):
    task = get_task("pope")
    items = task.load(benchmarks, "test")
    answers = {it.id: "Yes, there is." for it in items}
    m = task.score(items, answers)
    assert m["yes_ratio"] == 1.0 and m["accuracy"] == 0.5 and m["random/recall"] == 1.0
    assert {"random/f1", "adversarial/f1", "f1"} <= set(m)
    assert task.prompt(items[0], []).text.endswith("Answer the question using a single word or phrase.")


def test_benchmark_text_cannot_place_images_or_end_turns(benchmarks, tmp_path):
    """A question carrying `<image>` or chat tokens is text, not structure."""
    assert clean("what <image> is <|end|><|assistant|> this?") == "what   is    this?"
    root = shutil.copytree(benchmarks / "textvqa", tmp_path / "textvqa")
    path = root / "TextVQA_0.5.1_val.json"
    data = json.loads(path.read_text())
    data["data"][0]["question"] = "<image><image> hi <|endofchunk|>"
    path.write_text(json.dumps(data))
    item = get_task("textvqa").load(tmp_path, "test")[0]
    p = get_task("textvqa").prompt(item, [])
    assert p.text.count("<image>") == len(p.images) == 1 and "endofchunk" not in p.text


def test_limit_keeps_whole_questions(benchmarks):
    task = get_task("mmbench")
    kept = limit_items(task.load(benchmarks, "test"), 2, task)
    assert {it.target["group"] for it in kept} == {"0", "1"} and len(kept) == 4 + 3
    plain = [Item(str(i), lambda: None) for i in range(5)]
    assert [it.id for it in limit_items(plain, 2)] == ["0", "1"] and limit_items(plain, None) == plain


def test_read_done_drops_a_half_written_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"id": "1", "answer": "a"}) + "\n" + '{"id": "2", "ans')
    assert list(read_done(p)) == ["1"]
    assert read_done(tmp_path / "none.jsonl") == {}


@pytest.mark.parametrize("task, missing", [("vqav2", "v2_OpenEnded_mscoco_val2014_questions.json"),
                                           ("pope", "coco_pope_random.json"), ("mmbench", "mmbench_dev_en.tsv"),
                                           ("coco", "captions_val2014.json"), ("textvqa", "TextVQA_0.5.1_val.json")])
def test_missing_data_names_what_to_put_where(tmp_path, task, missing):
    with pytest.raises(UserError) as e:
        get_task(task).load(tmp_path, "test")
    assert missing in str(e.value) and "put" in str(e.value) and str(tmp_path) in str(e.value)


def test_bad_files_are_one_line_errors(benchmarks, tmp_path):
    root = shutil.copytree(benchmarks / "pope", tmp_path / "pope")
    (root / "coco_pope_random.json").write_text('{"question_id": 1, "image": "x.jpg", "text": "q", "label": "maybe"}\n')
    with pytest.raises(UserError, match="line 1: not a POPE question"):
        get_task("pope").load(tmp_path, "test")
    (tmp_path / "okvqa").mkdir()
    (tmp_path / "okvqa" / "OpenEnded_mscoco_val2014_questions.json").write_text("{not json")
    (tmp_path / "okvqa" / "mscoco_val2014_annotations.json").write_text("{}")
    with pytest.raises(UserError, match="not a readable JSON file"):
        get_task("okvqa").load(tmp_path, "test")
    with pytest.raises(UserError, match="unknown eval task 'gqa'"):
        get_task("gqa")
    assert set(TASKS) == {"vqav2", "okvqa", "textvqa", "vizwiz", "coco", "textcaps", "nocaps", "pope", "mmbench", "ai2d",
                          "scienceqa", "seedbench", "chartqa", "docvqa", "ocrbench", "mme", "mmmu"}


def test_cli_missing_benchmark_is_one_line(tmp_path, tiny_model_dir):
    r = blip3("eval", str(tiny_model_dir), "pope", "--data", str(tmp_path / "nothing"), "--db", str(tmp_path / "c.duckdb"))
    assert r.returncode == 2
    line = one_line_error(r)
    assert "coco_pope_random.json" in line and "put" in line


from tests.eval_fixtures import tiny_model_dir  # noqa: E402,F401  (fixture)
from tests.model_fixtures import tiny_config, tiny_processor  # noqa: E402,F401  (fixtures)


@pytest.mark.java
@pytest.mark.skipif(not java_available(), reason="captions are scored by pycocoevalcap, which runs Java")
def test_textcaps_and_nocaps_layouts_and_scores(benchmarks):
    tc = get_task("textcaps")
    items = tc.load(benchmarks, "test")
    assert [it.id for it in items] == ["tcval000", "tcval001", "tcval002"]  # one item per image, not per caption
    assert items[0].target["references"] == ["A sign that says open 0.", "A red sign with white letters."]
    assert tc.prompt(items[0], tc.load(benchmarks, "train")[:1]).text == (
        "<image>Output:A sign that says open 0.<|endofchunk|><image>Output:")
    nc = get_task("nocaps")
    nc.meteor = False  # its Java process takes seconds to start; test_eval_metrics covers it
    items = nc.load(benchmarks, "test")
    m = nc.score(items, {it.id: it.target["references"][0] for it in items})
    assert {"CIDEr", "BLEU-4", "in-domain/CIDEr", "near-domain/CIDEr", "out-domain/CIDEr"} <= set(m)
    assert m["CIDEr"] > 1.0
    # NoCaps has no train split: few-shot examples come from COCO's
    with pytest.raises(UserError, match="captions_train2014.json"):
        nc.load(benchmarks, "train")
