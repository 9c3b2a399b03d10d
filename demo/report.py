"""The demo's HTML report: what was made, what it costs, and how training went, on one page.

It links the pieces other commands already write (the audit contact sheets, with their
caption-length histograms shown inline, the mixture plot) and adds the training curves read from
each stage's `metrics.jsonl`: loss, learning rate, throughput (tokens/s) and, for DPO stages, the
reward margin (chosen - rejected) and reward accuracy. A curve appears only for the stages that
logged it.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from blip3.core.tables import format_cell  # noqa: E402
from blip3.train.metrics import read_metrics  # noqa: E402


@dataclass
class ReportInputs:
    out_dir: Path
    audits: dict[str, Path] = field(default_factory=dict)  # title -> audit index.html
    mixture_plot: Path | None = None
    stage_dirs: dict[str, Path] = field(default_factory=dict)  # stage name -> run dir
    tables: dict[str, list[dict]] = field(default_factory=dict)  # title -> rows (SQL results)
    notes: list[str] = field(default_factory=list)
    eval_plots: list[Path] = field(default_factory=list)  # benchmark metric across stages (eval.plot)


#: The training curves of the report: (metrics key, axis label, file name, section title, colour).
CURVES = (
    ("loss", "loss", "losses.png", "Training loss by stage", "#2b6cb0"),
    ("lr", "learning rate", "lr.png", "Learning rate by stage", "#805ad5"),
    ("tokens_per_s", "tokens / s", "throughput.png", "Throughput by stage", "#2f855a"),
    ("margin", "reward margin", "dpo_margin.png", "DPO reward margin (chosen - rejected)", "#c05621"),
    ("reward_acc", "reward accuracy", "dpo_reward_acc.png", "DPO reward accuracy", "#b7791f"),
)


def plot_metric(stage_dirs: dict[str, Path], key: str, ylabel: str, out: Path, color: str = "#2b6cb0") -> Path | None:
    """One panel per stage that logged `key`: its value against step (None when no stage did)."""
    curves = {name: read_metrics(d) for name, d in stage_dirs.items()}
    curves = {k: [r for r in v if isinstance(r.get(key), (int, float))] for k, v in curves.items()}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 2.8), squeeze=False)
    for ax, (name, rows) in zip(axes[0], curves.items()):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], color=color, lw=1.5)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _table(rows: list[dict]) -> str:
    if not rows:
        return "<p><em>no rows</em></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_cell(v))}</td>" for v in r.values()) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _rel(path: Path, base: Path) -> str:
    return html.escape(os.path.relpath(path, base))


def write_report(inp: ReportInputs) -> Path:
    """Write `report.html` (and the curves' PNGs, CURVES) into `inp.out_dir`; returns the page's path."""
    out = inp.out_dir
    curves = [(title, plot_metric(inp.stage_dirs, key, label, out / name, color))
              for key, label, name, title, color in CURVES]
    parts = ["<h1>blip3-engine demo</h1>"]
    if inp.notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in inp.notes) + "</ul>")
    if inp.audits:
        parts.append("<h2>Caption shards (contact sheets)</h2><ul>")
        for t, p in inp.audits.items():
            hist = p.parent / "caption_lengths.png"  # written by `blip3 audit` beside its page
            img = (f'<br><img class="hist" src="{_rel(hist, out)}" alt="caption lengths: {html.escape(t)}">'
                   if hist.is_file() else "")
            parts.append(f'<li><a href="{_rel(p, out)}">{html.escape(t)}</a>{img}</li>')
        parts.append("</ul>")
    for title, rows in inp.tables.items():
        parts.append(f"<h2>{html.escape(title)}</h2>{_table(rows)}")
    if inp.mixture_plot is not None:
        parts.append(f'<h2>Mixture</h2><img src="{_rel(inp.mixture_plot, out)}" alt="mixture composition">')
    if inp.eval_plots:
        parts.append("<h2>Benchmarks across stages</h2>" + "".join(
            f'<img src="{_rel(p, out)}" alt="{html.escape(p.stem)}">' for p in inp.eval_plots))
    for title, png in curves:
        if png is not None:
            parts.append(f'<h2>{html.escape(title)}</h2><img src="{_rel(png, out)}" alt="{html.escape(title)}">')
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#eef}img{max-width:100%}"
        "img.hist{width:360px}"
    )
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>blip3-engine demo</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    path = out / "report.html"
    path.write_text(page)
    return path
