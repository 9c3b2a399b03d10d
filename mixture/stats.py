"""`blip3 mix stats NAME`: the catalog views, restricted to one mixture and its sources.

Every table is a plain query over the views in `core.views`, run read-only through `core.sql`,
so what this prints is exactly what `blip3 sql` can ask.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from blip3.core.errors import UserError
from blip3.core.sql import run_query


def _quote(name: str) -> str:
    return "'" + name.replace("'", "''") + "'"


def mixture_queries(name: str) -> dict[str, str]:
    """Title -> SQL, for the mixture `name`."""
    q = _quote(name)
    in_mix = f"source IN (SELECT source FROM mixture_sources WHERE mixture = {q})"
    return {
        "mixture": f"SELECT * EXCLUDE (manifest_path, created_at) FROM v_mixture_summary WHERE mixture = {q}",
        "weights, tokens and epochs per source": (
            "SELECT source, kind, target_weight, realised_weight, sample_share, token_share, available_samples, "
            f"planned_samples, available_tokens, planned_tokens, epochs FROM v_mixture_sources WHERE mixture = {q}"
        ),
        "OCR / grounding coverage": f"SELECT * FROM v_coverage WHERE {in_mix}",
        "caption length (characters)": f"SELECT * FROM v_caption_length_quantiles WHERE {in_mix}",
        "failure reasons": f"SELECT * FROM v_failure_share WHERE {in_mix}",
        "curation: samples each rule left out": (
            "SELECT c.source, c.rule, c.removed, round(c.removed / ms.available_samples, 4) AS share_of_source "
            f"FROM mixture_curation c JOIN mixture_sources ms ON ms.mixture = c.mixture AND ms.source = c.source "
            f"WHERE c.mixture = {q} ORDER BY c.source, c.rule"),
    }


def mixture_stats(name: str, db: str | Path | None = None) -> dict[str, pl.DataFrame]:
    """Title -> polars DataFrame of each stats query; UserError when the mixture is not catalogued."""
    known = run_query(f"SELECT name FROM mixtures WHERE name = {_quote(name)}", db)
    if known.num_rows == 0:
        names = run_query("SELECT name FROM mixtures ORDER BY name", db).column("name").to_pylist()
        raise UserError(f"no mixture {name!r} in the catalog (have: {', '.join(names) or 'none'}); "
                        f"build it with `blip3 mix build`", field="NAME")
    return {title: pl.from_arrow(run_query(sql, db)) for title, sql in mixture_queries(name).items()}
