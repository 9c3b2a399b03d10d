"""`blip3 eval` end to end: a real tiny checkpoint, tiny benchmark files, the real catalog."""

from __future__ import annotations

import json

import duckdb
import pyarrow.parquet as pq
import pytest

from blip3.eval.metrics import java_available
from blip3.eval.runner import evaluate
from tests.eval_fixtures import benchmarks, tiny_model_dir  # noqa: F401  (fixtures)
from tests.model_fixtures import tiny_config, tiny_processor  # noqa: F401  (fixtures)
from tests.test_cli_errors import blip3
from tests.train_fixtures import tiny_stage, tiny_vars

ALL = ["vqav2", "okvqa", "textvqa", "coco", "pope", "mmbench"]


def _evals(db) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute("SELECT task, shots, metric, value, n FROM evals ORDER BY task, shots, metric").fetchall()


@pytest.mark.java
@pytest.mark.skipif(not java_available(), reason="coco is scored by pycocoevalcap, which runs Java (`make test` installs it)")
def test_every_task_runs_records_and_resumes(tiny_model_dir, benchmarks, tmp_path):
    db, out = tmp_path / "catalog.duckdb", tmp_path / "preds"
    results = evaluate(tiny_model_dir, ALL, data=benchmarks, out=out, limit=2, batch_size=3, db=db, meteor=False)
    assert [r.task for r in results] == ALL
    rows = _evals(db)
    by_task = {t: {m: (v, n) for tt, _, m, v, n in rows if tt == t} for t in ALL}
    assert set(by_task["coco"]) == {"CIDEr", "BLEU-4"}
    assert by_task["vqav2"]["accuracy"][1] == 2 and by_task["pope"]["f1"][1] == 2
    assert by_task["mmbench"]["circular_accuracy"][1] == 4 + 3  # rows are rotations; 2 questions kept
    assert all(0.0 <= v <= 1.0 for t in ("vqav2", "pope", "mmbench") for v, _ in by_task[t].values())
    # per-sample predictions: one parquet row per item, each with the generated text and a score
    preds = pq.read_table(out / "pope-0shot.parquet").to_pylist()
    assert len(preds) == 2 and all(p["prompt"].startswith("<image>\nIs there a dog") for p in preds)
    assert all(p["score"] in (0.0, 1.0) for p in preds)

    # Resume: drop all but the first answer of a task, and re-run: only the rest is generated,
    # the kept answer is not recomputed, and the catalog rows are replaced, not duplicated.
    path = out / "vqav2-0shot.jsonl"
    first = json.loads(path.read_text().splitlines()[0])
    first["generated"] = first["answer"] = "kept from the first run"
    path.write_text(json.dumps(first) + "\n")
    evaluate(tiny_model_dir, ["vqav2"], data=benchmarks, out=out, limit=2, db=db)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 2 and lines[0] == first
    assert len(_evals(db)) == len(rows)
    pq_rows = pq.read_table(out / "vqav2-0shot.parquet").to_pylist()
    assert pq_rows[0]["answer"] == "kept from the first run"


def test_few_shot_prompts_carry_train_examples(tiny_model_dir, benchmarks, tmp_path):
    db, out = tmp_path / "catalog.duckdb", tmp_path / "preds"
    evaluate(tiny_model_dir, ["vqav2"], data=benchmarks, out=out, shots=4, limit=1, db=db)
    row = json.loads((out / "vqav2-4shot.jsonl").read_text())
    assert row["prompt"].count("<image>") == 5 and row["prompt"].count("Short answer:2<|endofchunk|>") == 4
    assert [r[:2] for r in _evals(db)] == [("vqav2", 4)]


def test_cli_prints_the_table_and_refuses_few_shot_instruct_tasks(tiny_model_dir, benchmarks, tmp_path):
    db = tmp_path / "c.duckdb"
    r = blip3("eval", str(tiny_model_dir), "pope", "--data", str(benchmarks), "--limit", "1", "--out",
              str(tmp_path / "p"), "--db", str(db))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "yes_ratio" in r.stdout and "random/f1" in r.stdout
    r = blip3("eval", str(tiny_model_dir), "mmbench", "--shots", "4", "--data", str(benchmarks), "--db", str(db))
    assert r.returncode == 2 and "zero-shot" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_stage_benchmarks_run_at_its_end_and_join_its_mixture(benchmarks, tmp_path):
    """The tiny pretrain stage names TextVQA in its stage file: training ends, the benchmark runs on
    the exported model, and the catalog answers "TextVQA accuracy by OCR share of the mixture
    named tiny-pretrain"."""
    from blip3.train.config import BenchmarkConfig
    from blip3.train.loop import train_stage

    db = tmp_path / "catalog.duckdb"
    cfg = tiny_stage("pretrain", tmp_path, steps=2, checkpoint_every=0, eval_every=0,
                     benchmarks=BenchmarkConfig(tasks=["textvqa"], data=str(benchmarks), limit=2))
    stage = train_stage(cfg, db=db, data_vars=tiny_vars())
    assert (stage.final_dir / "eval" / "textvqa-0shot.parquet").is_file()
    with duckdb.connect(str(db), read_only=True) as con:
        mixture = con.execute("SELECT name FROM mixtures").fetchone()[0]
        rows = con.execute(
            "SELECT run_id, stage, value, n, mixture_ocr_share, sources FROM v_eval_mixture "
            "WHERE task = 'textvqa' AND metric = 'accuracy' AND mixture = ?", [mixture]).fetchall()
        shares = con.execute("SELECT sum(sample_share) FROM v_eval_sources WHERE mixture = ?", [mixture]).fetchone()[0]
        run_ids = con.execute("SELECT DISTINCT run_id FROM evals").fetchall()
    assert run_ids == [(stage.run_id,)]
    assert len(rows) == 1
    _, stage_name, accuracy, n, ocr_share, sources = rows[0]
    assert stage_name == "pretrain" and n == 2 and 0.0 <= accuracy <= 1.0
    assert sources >= 1 and 0.0 <= ocr_share <= 1.0 and shares == pytest.approx(1.0, abs=1e-3)

    # Evaluated again by hand (another task): the run is found through the model's train_info.json.
    results = evaluate(stage.output_dir, ["pope"], data=benchmarks, out=tmp_path / "preds", limit=1, db=db)
    assert results[0].run_id == stage.run_id


@pytest.mark.parametrize("bench, field", [({"tasks": ["gqa"]}, "benchmarks.tasks[0]"),
                                          ({"tasks": ["pope"], "shots": 4}, "benchmarks.tasks[0]"),
                                          ({"tasks": ["vqav2"], "limit": 0}, "benchmarks.limit")])
def test_stage_file_benchmarks_are_checked_when_loaded(tmp_path, bench, field):
    import yaml

    from blip3.core.errors import UserError
    from blip3.train.config import load_stage
    from tests.train_fixtures import TINY

    raw = yaml.safe_load((TINY / "pretrain.yaml").read_text())
    raw["benchmarks"] = bench
    raw["data"]["spec"] = str(TINY / raw["data"]["spec"])
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError) as e:
        load_stage(path)
    assert e.value.field == field and str(path) in str(e.value)


@pytest.mark.slow
def test_torchrun_ranks_split_the_questions(tiny_model_dir, benchmarks, tmp_path):
    """Two CPU ranks (gloo): each answers half the questions into its own file; rank 0 scores
    them all, records once, and a re-run answers nothing again."""
    import os
    import subprocess
    import sys

    from tests.train_fixtures import ROOT

    env = {**os.environ, "BLIP3_NO_PROGRESS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out, db = tmp_path / "preds", tmp_path / "c.duckdb"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "blip3.cli",
           "eval", str(tiny_model_dir), "pope", "--data", str(benchmarks), "--limit", "5", "--batch-size", "2",
           "--out", str(out), "--db", str(db)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [len((out / f"pope-0shot.rank{k}.jsonl").read_text().splitlines()) for k in (0, 1)]
    assert sorted(ranks) == [2, 3]
    assert _evals(db) and {row[4] for row in _evals(db)} == {5}
    assert len(pq.read_table(out / "pope-0shot.parquet")) == 5
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [len((out / f"pope-0shot.rank{k}.jsonl").read_text().splitlines()) for k in (0, 1)] == ranks


def test_stage_with_missing_benchmark_files_stops_before_training(tmp_path):
    from blip3.core.errors import UserError
    from blip3.train.config import BenchmarkConfig
    from blip3.train.loop import train_stage

    cfg = tiny_stage("pretrain", tmp_path, steps=2, checkpoint_every=0, eval_every=0,
                     benchmarks=BenchmarkConfig(tasks=["pope"], data=str(tmp_path / "nothing")))
    with pytest.raises(UserError, match="coco_pope_random.json"):
        train_stage(cfg, db=tmp_path / "c.duckdb", data_vars=tiny_vars())
    assert not (tmp_path / "pretrain").exists()  # no step was run, nothing was written
