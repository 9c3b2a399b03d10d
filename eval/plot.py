"""One picture per benchmark: its headline metric across the training stages that were evaluated."""

from __future__ import annotations

from pathlib import Path

from blip3.eval.tasks import TASKS


def plot_evals(db: str | Path, out_dir: Path) -> list[Path]:
    """`eval_<task>.png` per task with results in the catalog's `evals` table (none: no files).

    x: the evaluated checkpoints in the order their runs finished (labelled by stage), y: the
    task's headline metric, one line per shot count."""
    import duckdb
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from blip3.core.catalog import open_catalog

    if not Path(db).is_file():
        return []
    con = open_catalog(Path(db), read_only=True)
    try:
        if not con.execute("SELECT 1 FROM information_schema.tables WHERE table_name = 'evals'").fetchone():
            return []
        rows = con.execute(
            "SELECT e.task, e.metric, e.shots, coalesce(r.stage || ' (' || r.run_id[:8] || ')', e.checkpoint), e.value "
            "FROM evals e LEFT JOIN runs r ON r.run_id = e.run_id "
            "ORDER BY r.finished_at NULLS LAST, e.evaluated_at").fetchall()
    except duckdb.Error:
        return []
    finally:
        con.close()
    paths = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for task, cls in TASKS.items():
        points = [(shots, label, value) for t, metric, shots, label, value in rows if t == task and metric == cls.metric]
        if not points:
            continue
        labels = list(dict.fromkeys(label for _, label, _ in points))
        fig, ax = plt.subplots(figsize=(max(3.5, 1.2 * len(labels)), 2.8))
        for shots in sorted({s for s, _, _ in points}):
            pts = {label: value for s, label, value in points if s == shots}
            xs = [i for i, label in enumerate(labels) if label in pts]
            ax.plot(xs, [pts[labels[i]] for i in xs], marker="o", label=f"{shots}-shot")
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
        ax.set_ylabel(cls.metric)
        ax.set_title(task)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"eval_{task}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
