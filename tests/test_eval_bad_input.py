"""Hostile and broken benchmark inputs: one line, or a failed row with its reason; never a
traceback, never a question silently lost or scored with another's answers."""

from __future__ import annotations

import json
import shutil

import duckdb
import pyarrow.parquet as pq
import pytest
from PIL import Image

from blip3.core.errors import UserError
from blip3.eval.metrics import MAX_VQA_ANSWERS
from blip3.eval.protocols import OFFICIAL
from blip3.eval.runner import _training_run, evaluate, plan_task
from blip3.eval.tasks import get_task
from tests.eval_fixtures import benchmarks, tiny_model_dir  # noqa: F401  (fixtures)
from tests.model_fixtures import tiny_config, tiny_processor  # noqa: F401  (fixtures)

QFILE = "v2_OpenEnded_mscoco_val2014_questions.json"
AFILE = "v2_mscoco_val2014_annotations.json"


def _vqa_copy(benchmarks, tmp_path):
    shutil.copytree(benchmarks / "vqav2", tmp_path / "vqav2")
    base = tmp_path / "vqav2"
    return base, json.loads((base / QFILE).read_text()), json.loads((base / AFILE).read_text())


@pytest.mark.parametrize("task, rel", [("vqav2", f"vqav2/{QFILE}"), ("pope", "pope/coco_pope_random.json"),
                                       ("mmbench", "mmbench/mmbench_dev_en.tsv"), ("textvqa", "textvqa/TextVQA_0.5.1_val.json")])
def test_a_file_that_is_not_utf8_is_one_line(benchmarks, tmp_path, task, rel):
    shutil.copytree(benchmarks / rel.split("/")[0], tmp_path / rel.split("/")[0])
    path = tmp_path / rel
    path.write_bytes(path.read_bytes() + "caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8") as e:
        get_task(task).load(tmp_path, "test")
    assert str(path) in str(e.value)


@pytest.mark.parametrize("text, message", [
    ('{"questions": [{"question_id": Infinity, "image_id": 1, "question": "q"}]}', "Infinity is not a JSON number"),
    ('{"questions": [{"question_id": NaN, "image_id": 1, "question": "q"}]}', "NaN is not a JSON number"),
    ('{"questions": ' + "[" * 200_000 + "]" * 200_000 + "}", "nested too deeply"),
    ('{"questions": [{"question_id": 1.5, "image_id": 1, "question": "q"}]}', "1.5 is not an integer or a string"),
])
def test_ids_that_are_not_ids_and_deep_json_are_one_line(benchmarks, tmp_path, text, message):
    base, _, _ = _vqa_copy(benchmarks, tmp_path)
    (base / QFILE).write_text(text)
    with pytest.raises(UserError, match=message):
        get_task("vqav2").load(tmp_path, "test")


def test_mmbench_without_an_index_column_is_one_line(benchmarks, tmp_path):
    shutil.copytree(benchmarks / "mmbench", tmp_path / "mmbench")
    path = tmp_path / "mmbench" / "mmbench_dev_en.tsv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(["idx" + lines[0][len("index"):], *lines[1:]]) + "\n")
    with pytest.raises(UserError, match="no index column"):
        get_task("mmbench").load(tmp_path, "test")


def test_questions_that_cannot_be_scored_fail_before_generation(benchmarks, tmp_path):
    """No human answers, an absurd answer list, a duplicate question_id, conflicting annotations:
    each a failed row with its reason, decided when the files are read (no model loaded yet)."""
    base, questions, annotations = _vqa_copy(benchmarks, tmp_path)
    qs, anns = questions["questions"], annotations["annotations"]
    anns[0]["answers"] = []
    anns[1]["answers"] = [{"answer": "2", "answer_id": k} for k in range(MAX_VQA_ANSWERS + 1)]
    qs.append(dict(qs[2], question="A second question under id 1002?"))  # duplicate question_id
    (base / QFILE).write_text(json.dumps(questions))
    (base / AFILE).write_text(json.dumps(annotations))
    plan = plan_task("vqav2", OFFICIAL, tmp_path, 0, None, 0)
    errors = [(it.id, it.error) for it in plan.items]
    assert errors[0] == ("1000", "no human answers")
    assert errors[1][0] == "1001" and "more than 100" in errors[1][1]
    assert errors[2] == ("1002", None) and plan.items[2].question == "How many dogs are there 2?"
    assert errors[3][0] == "1002" and "duplicate id" in errors[3][1]
    anns.append(dict(anns[2], answers=[{"answer": "7"}] * 10))  # annotated twice, differently
    (base / AFILE).write_text(json.dumps(annotations))
    assert "twice, with different answers" in get_task("vqav2").load(tmp_path, "test")[2].error
    with pytest.raises(UserError, match="no vqav2 questions that can be asked"):
        plan_task("vqav2", OFFICIAL, tmp_path, 0, None, 0)


def test_failed_rows_are_recorded_and_the_run_goes_on(benchmarks, tiny_model_dir, tmp_path, monkeypatch):
    """A duplicate id and a decompression bomb (Pillow's DecompressionBombError is no OSError)
    among good questions: the good ones are answered and scored, the others are parquet rows with
    their reason, and the catalog counts them."""
    base, questions, _ = _vqa_copy(benchmarks, tmp_path)
    questions["questions"].append(dict(questions["questions"][0], question="Another question with id 1000?"))
    (base / QFILE).write_text(json.dumps(questions))
    Image.new("L", (200, 200)).save(base / "val2014" / "COCO_val2014_000000000101.jpg")  # the image of 1001
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # a bomb: over twice the limit
    db, out = tmp_path / "c.duckdb", tmp_path / "preds"
    (result,) = evaluate(tiny_model_dir, ["vqav2"], data=tmp_path, out=out, db=db)
    rows = pq.read_table(out / "vqav2-0shot.parquet").to_pylist()
    assert [(r["id"], r["error"] is None) for r in rows] == [("1000", True), ("1001", False), ("1002", True),
                                                              ("1000", False)]
    assert "decompression-bomb" in rows[1]["error"] and "duplicate id" in rows[3]["error"]
    assert rows[3]["answer"] is None and rows[0]["answer"] is not None
    assert result.n == 2 and result.failed == 2 and result.metrics["failed"] == 2.0
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT value, n FROM evals WHERE metric = 'failed'").fetchall() == [(2.0, 2)]


def test_nan_weights_are_not_evaluated_nor_recorded(benchmarks, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model = shutil.copytree(tiny_model_dir, tmp_path / "nan-model")
    weights = load_file(model / "model.safetensors")
    save_file({k: v.float().fill_(float("nan")).to(v.dtype) if v.is_floating_point() else v
               for k, v in weights.items()}, model / "model.safetensors")
    db = tmp_path / "c.duckdb"
    with pytest.raises(UserError, match="weight tensors hold NaN or infinite values") as e:
        evaluate(model, ["pope"], data=benchmarks, out=tmp_path / "p", limit=1, db=db)
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "p").glob("*.jsonl"))  # nothing answered
    if db.exists():
        with duckdb.connect(str(db), read_only=True) as con:
            tables = {t for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            assert "evals" not in tables or con.execute("SELECT count(*) FROM evals").fetchone()[0] == 0


def test_train_info_that_is_not_utf8_falls_back_to_the_catalog(tmp_path, caplog):
    from blip3.core.catalog import Catalog

    ckpt = tmp_path / "model"
    ckpt.mkdir()
    (ckpt / "train_info.json").write_bytes(b'{"run_id": "caf\xe9"}')
    db = tmp_path / "c.duckdb"
    with Catalog(db) as cat:
        cat.record_run(run_id="run-1", stage="sft", checkpoint=str(ckpt.resolve()))
    assert _training_run(ckpt, db) == "run-1"
    assert "not a readable train_info.json (UnicodeDecodeError)" in caplog.text


def test_an_mmbench_pass_failing_at_run_time_fails_its_whole_question(benchmarks, tmp_path):
    """One pass of question 0 could not be asked (its image failed when loaded): the question is
    not scored on its other passes, which would make it easier."""
    from blip3.eval.runner import _finish

    task = get_task("mmbench")
    items = [it for it in task.load(benchmarks, "test") if it.target["group"] in ("0", "1")]
    done = {it.id: {"id": it.id, "prompt": "p", "generated": it.target["answer"], "answer": it.target["answer"]}
            for it in items}
    done["2000000"] = {"id": "2000000", "error": "row 4: the image column: not a readable image (ValueError)"}
    res = _finish(task, "mmbench", items, done, 0, tmp_path, tmp_path / "mmbench-0shot.jsonl", None,
                  tmp_path / "c.duckdb")
    assert res.failed == 4 and res.n == 3 and res.metrics["circular_accuracy"] == 1.0
    rows = {r["id"]: r for r in pq.read_table(res.predictions).to_pylist()}
    assert "another item of question 0 failed" in rows["0"]["error"] and rows["0"]["score"] is None
    assert rows["1"]["error"] is None and rows["1"]["score"] == 1.0


def test_captioning_without_java_is_one_line_before_the_model_loads(benchmarks, tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    from tests.test_cli_errors import REPO, one_line_error

    env = dict(os.environ, BLIP3_NO_PROGRESS="1", PATH=str(tmp_path))  # no `java` anywhere on PATH
    r = subprocess.run([sys.executable, "-m", "blip3.cli", "eval", str(tiny_model_dir), "coco", "--data", str(benchmarks),
                        "--out", str(tmp_path / "p"), "--db", str(tmp_path / "c.duckdb")],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    line = one_line_error(r)
    assert "default-jre-headless" in line and "java" in line
    assert not (tmp_path / "p").exists()
