"""Benchmark results across stages: one picture per task, on the demo report."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from blip3.core.catalog import Catalog
from blip3.demo.report import ReportInputs, write_report
from blip3.eval.plot import plot_evals


def test_one_plot_per_task_with_results_and_on_the_report(tmp_path):
    db = tmp_path / "c.duckdb"
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with Catalog(db) as cat:
        for i, stage in enumerate(["pretrain", "sft"]):
            ckpt = tmp_path / stage
            cat.record_run(run_id=f"run-{stage}", stage=stage, checkpoint=str(ckpt), finished_at=t0 + timedelta(hours=i))
            cat.record_eval(checkpoint=ckpt, task="textvqa", shots=0, metrics={"accuracy": 0.1 * (i + 1)}, n=5,
                            run_id=f"run-{stage}")
            cat.record_eval(checkpoint=ckpt, task="pope", shots=0, metrics={"f1": 0.5, "yes_ratio": 0.9}, n=5,
                            run_id=f"run-{stage}")
        # re-recording replaces: still one row per metric
        cat.record_eval(checkpoint=tmp_path / "sft", task="pope", shots=0, metrics={"f1": 0.6, "yes_ratio": 0.8}, n=5,
                        run_id="run-sft")
        assert cat.con.execute("SELECT count(*) FROM evals WHERE task = 'pope'").fetchone()[0] == 4
    paths = plot_evals(db, tmp_path / "report")
    assert [p.name for p in paths] == ["eval_textvqa.png", "eval_pope.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    page = write_report(ReportInputs(out_dir=tmp_path / "report", eval_plots=paths)).read_text()
    assert "Benchmarks across stages" in page and 'src="eval_pope.png"' in page


def test_no_results_no_plots(tmp_path):
    db = tmp_path / "c.duckdb"
    Catalog(db).close()
    assert plot_evals(db, tmp_path / "out") == []
    assert plot_evals(tmp_path / "no-catalog.duckdb", tmp_path / "out") == []  # a demo that trained nothing
    assert "Benchmarks" not in write_report(ReportInputs(out_dir=tmp_path)).read_text()
