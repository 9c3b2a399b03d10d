"""The curation part of `blip3 audit`: what `blip3 curate` decided about the audited shards.

When the catalog holds decisions for the shards (datagen/curate.py), the audit page gains:

- **duplicate clusters side by side**: each cluster's members in one row, the sample kept first,
  each with its reason (exact, near and semantic duplicates);
- **dropped samples with their reason**, by rule;
- **score histograms with the thresholds drawn** (`scores.png`): every recorded score, with the
  threshold each rule applied (read back from the decisions' reasons, else the rule's default).

Images are read from the tars by their index (one seek per sample shown), never all of them.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

from blip3.core.catalog import open_catalog
from blip3.core.curation import shard_decisions
from blip3.core.shards import read_members
from blip3.datagen.curate_rules import THRESHOLD_RULES

THUMB = 160
_THRESHOLD = re.compile(r"^(?P<score>\w+) \S+ (?P<op>below|above) (?P<x>[-0-9.e+]+)$")


@dataclass
class CurationAudit:
    html: str
    plots: list[Path]
    clusters: int
    dropped: int


def _thumb(tar: str, key: str, out: Path, name: str, cache: dict) -> str:
    """An <img> of the sample's image (or a note when it cannot be shown)."""
    from PIL import Image

    from blip3.datagen.image_hash import open_image
    from blip3.mixture.tar_index import index_tar

    try:
        if tar not in cache:
            cache[tar] = {e.key: e for e in index_tar(tar)}
        entry = cache[tar].get(key)
        if entry is None:
            return '<div class="broken">not in the tar</div>'
        with open(tar, "rb") as f:
            members = read_members(f, entry)
        data = next((v for k, v in members.items() if k.rsplit(".", 1)[-1].lower() in
                     ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")), None)
        img = open_image(data).convert("RGB")
    except Exception:  # noqa: BLE001 - a sample that cannot be shown is said so, the page still renders
        return '<div class="broken">image does not decode</div>'
    img.thumbnail((THUMB, THUMB), Image.Resampling.BILINEAR)
    img.save(out / name, format="JPEG", quality=85)
    return f'<img src="{name}" width="{img.width}" height="{img.height}" alt="{html.escape(key)}">'


def curation_audit(db: Path, shards: list[str], out: Path, *, max_clusters: int = 24, max_dropped: int = 48) -> CurationAudit | None:
    """The sections and plot for `shards` (absolute paths), or None when nothing was decided."""
    if not Path(db).is_file():
        return None
    con = open_catalog(Path(db), read_only=True)
    try:
        recorded = shard_decisions(con, shards)
    finally:
        con.close()
    if recorded is None:
        return None
    members, dropped, scores, reasons = recorded.members, recorded.dropped, recorded.scores, recorded.reasons
    (out / "curation").mkdir(parents=True, exist_ok=True)
    cache: dict = {}
    clusters: dict[tuple[str, str], list] = {}
    for rule, cluster, kept, shard, key, reason in members:
        clusters.setdefault((rule, cluster), []).append((kept, shard, key, reason))
    rows = []
    for n, ((rule, _), group) in enumerate(list(clusters.items())[:max_clusters]):
        cells = "".join(
            f'<figure class="{"kept" if kept else "dropped"}">'
            f'{_thumb(shard, key, out, f"curation/c{n:03d}_{j:02d}.jpg", cache)}'
            f'<figcaption><b>{html.escape(key)}</b> <small>{html.escape(Path(shard).name)}</small>'
            f'<br>{"kept" if kept else "dropped"}: {html.escape(reason or "")}</figcaption></figure>'
            for j, (kept, shard, key, reason) in enumerate(group))
        rows.append(f'<div class="cluster"><h3>{html.escape(rule)}: {len(group)} samples</h3>{cells}</div>')
    drops = "".join(
        f'<figure class="dropped">{_thumb(shard, key, out, f"curation/d{n:03d}.jpg", cache)}'
        f'<figcaption><b>{html.escape(key)}</b> <small>{html.escape(Path(shard).name)}</small><br>'
        f'{html.escape(rule)}: {html.escape(reason or "")}</figcaption></figure>'
        for n, (rule, shard, key, reason) in enumerate(dropped[:max_dropped]))
    thresholds = _thresholds(reasons)
    plots = [_plot_scores(out, scores, thresholds)] if scores else []
    page = (f'<section id="curation"><h2>Curation: {len(clusters)} duplicate cluster(s), {len(dropped)} sample(s) '
            f'dropped by a filter</h2><h3>Duplicate clusters (kept first)</h3>{"".join(rows) or "<p>None.</p>"}'
            f'<h3>Dropped samples, with their reason ({min(len(dropped), max_dropped)} of {len(dropped)} shown)</h3>'
            f'<div class="drops">{drops or "<p>None.</p>"}</div></section>')
    return CurationAudit(page, plots, len(clusters), len(dropped))


def _thresholds(reasons: list[tuple[str, str]]) -> dict[str, tuple[float, str]]:
    """score -> (threshold, rule) as applied (from "min_side 120.0 below 200"), else the defaults."""
    out = {r.score: (float(r.default), r.name) for r in THRESHOLD_RULES.values() if r.default is not None}
    for rule, reason in reasons:
        m = _THRESHOLD.match(reason)
        if m and rule in THRESHOLD_RULES:
            out[m["score"]] = (float(m["x"]), rule)
    return out


def _plot_scores(out: Path, scores: list[tuple[str, float]], thresholds: dict[str, tuple[float, str]]) -> Path:
    """scores.png: one histogram per score, the threshold applied drawn as a red line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name: dict[str, list[float]] = {}
    for name, value in scores:
        by_name.setdefault(name, []).append(value)
    names = sorted(by_name)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), constrained_layout=True, squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        ax.hist(by_name[name], bins=30, color="#1f77b4", edgecolor="white")
        ax.set_title(f"{name} (n={len(by_name[name])})", fontsize=9)
        if name in thresholds:
            x, rule = thresholds[name]
            ax.axvline(x, color="#d62728", linewidth=2, label=f"{rule} {x:g}")
            ax.legend(fontsize=7)
    path = out / "scores.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
