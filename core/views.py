"""SQL views over the catalog tables: the questions data engineers ask, answerable with `blip3 sql`.

Created (or replaced) every time the catalog is opened for writing, so an old catalog file gains
new views without a migration.
"""

from __future__ import annotations

import duckdb

VIEWS: dict[str, str] = {
    # One line per source: shards, samples, failures, caption lengths, OCR/grounding coverage.
    "v_source_summary": """
        SELECT s.source,
               src.kind,
               count(DISTINCT s.shard)                                   AS shards,
               count(*)                                                  AS samples,
               count(*) FILTER (WHERE s.status = 'success')              AS ok,
               count(*) FILTER (WHERE s.status <> 'success')             AS failed,
               round(avg(s.caption_length) FILTER (WHERE s.status = 'success'), 1) AS mean_caption_chars,
               round(avg(CASE WHEN s.n_ocr > 0 THEN 1.0 ELSE 0.0 END)
                     FILTER (WHERE s.status = 'success'), 4)             AS ocr_coverage,
               round(avg(CASE WHEN s.n_objects > 0 THEN 1.0 ELSE 0.0 END)
                     FILTER (WHERE s.status = 'success'), 4)             AS object_coverage,
               sum(s.image_bytes)                                        AS image_bytes
        FROM samples s LEFT JOIN sources src ON src.name = s.source
        GROUP BY s.source, src.kind
    """,
    # Failure reasons by source (reason = text before the first colon of the error).
    "v_failures": """
        SELECT source,
               split_part(error, ':', 1) AS reason,
               count(*)                 AS n
        FROM samples WHERE status <> 'success'
        GROUP BY ALL ORDER BY source, n DESC
    """,
}


def create_views(con: duckdb.DuckDBPyConnection) -> None:
    for name, body in VIEWS.items():
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {body}")
