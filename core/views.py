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
    # Failure reasons by source (reason = text before the first colon of the error message).
    "v_failures": """
        SELECT source,
               split_part(error_message, ':', 1) AS reason,
               count(*)                 AS n
        FROM samples WHERE status <> 'success'
        GROUP BY ALL ORDER BY source, n DESC
    """,
    # Failure reasons with their share of all input samples of the source.
    "v_failure_share": """
        WITH totals AS (SELECT source, count(*) AS inputs FROM samples GROUP BY source)
        SELECT f.source, f.reason, f.n, t.inputs, round(f.n / t.inputs, 4) AS share
        FROM v_failures f JOIN totals t USING (source)
        ORDER BY f.source, f.n DESC
    """,
    # Tokens and samples per source, and how the tokens were counted (tokenizer or estimate).
    "v_source_tokens": """
        SELECT name AS source, kind, n_shards AS shards, n_samples AS samples, n_tokens AS tokens,
               round(n_tokens / nullif(n_samples, 0), 1)          AS tokens_per_sample,
               json_extract_string(meta, '$.tokenizer')             AS tokenizer,
               json_extract_string(meta, '$.token_count')           AS token_count
        FROM sources ORDER BY name
    """,
    # OCR / grounding coverage per source: share of good samples with text / objects, and density.
    "v_coverage": """
        SELECT source,
               count(*)                                                   AS samples,
               round(avg(CASE WHEN n_ocr > 0 THEN 1.0 ELSE 0.0 END), 4)     AS text_share,
               round(avg(CASE WHEN n_objects > 0 THEN 1.0 ELSE 0.0 END), 4) AS object_share,
               round(avg(coalesce(n_ocr, 0)), 3)                          AS ocr_per_image,
               round(avg(coalesce(n_objects, 0)), 3)                      AS objects_per_image,
               round(avg(mean_confidence), 4)                             AS mean_confidence
        FROM samples WHERE status = 'success'
        GROUP BY source ORDER BY source
    """,
    # Caption length distribution: 32-character buckets up to 512, then one open bucket.
    "v_caption_lengths": """
        WITH b AS (
            SELECT source, least(caption_length // 32, 16) * 32 AS lo
            FROM samples WHERE status = 'success' AND caption_length IS NOT NULL
        )
        SELECT source, lo AS chars_from, CASE WHEN lo = 512 THEN NULL ELSE lo + 31 END AS chars_to,
               count(*) AS n, round(count(*) / sum(count(*)) OVER (PARTITION BY source), 4) AS share
        FROM b GROUP BY source, lo ORDER BY source, lo
    """,
    # Exact quantiles from the per-length counts (lengths are integers): a hash aggregate plus a
    # small window, instead of sorting every row (5x faster at 10M rows).
    "v_caption_length_quantiles": """
        WITH h AS (
            SELECT source, caption_length AS len, count(*) AS n
            FROM samples WHERE status = 'success' AND caption_length IS NOT NULL
            GROUP BY ALL
        ), c AS (
            SELECT source, len, n,
                   sum(n) OVER (PARTITION BY source ORDER BY len) AS cum,
                   sum(n) OVER (PARTITION BY source)              AS total
            FROM h
        )
        SELECT source, max(total)::BIGINT AS n, min(len) AS min,
               min(len) FILTER (WHERE cum >= 0.1 * total) AS p10,
               min(len) FILTER (WHERE cum >= 0.5 * total) AS p50,
               min(len) FILTER (WHERE cum >= 0.9 * total) AS p90,
               max(len) AS max, round(sum(len * n) / max(total), 1) AS mean
        FROM c GROUP BY source ORDER BY source
    """,
    # `blip3 recaption`'s per-sample scores (table sample_scores, long form) as one row per sample,
    # one column per score; samples with none of them (curate's scores only) are left out.
    "v_recaption_scores": """
        SELECT source, shard, key,
               max(value) FILTER (WHERE name = 'length_chars')     AS length_chars,
               max(value) FILTER (WHERE name = 'length_words')     AS length_words,
               max(value) FILTER (WHERE name = 'repetition_3gram') AS repetition_3gram,
               max(value) FILTER (WHERE name = 'refusal')          AS refusal,
               max(value) FILTER (WHERE name = 'empty')            AS empty,
               max(value) FILTER (WHERE name = 'merged')           AS merged,
               max(value) FILTER (WHERE name = 'alt_entities')     AS alt_entities,
               max(value) FILTER (WHERE name = 'entities_kept')    AS entities_kept,
               max(value) FILTER (WHERE name = 'entity_survival')  AS entity_survival
        FROM sample_scores WHERE name IN ('length_chars', 'length_words', 'repetition_3gram', 'refusal', 'empty',
                                          'merged', 'alt_entities', 'entities_kept', 'entity_survival')
        GROUP BY source, shard, key
    """,
    # Recaptioning quality per source: length, degenerate loops (3-gram repetition over 0.5),
    # refusals, empty rewrites, the share rewritten with the alt-text, entity survival.
    "v_recaption_quality": """
        SELECT source, count(*) AS samples,
               round(avg(length_chars), 1)                                     AS mean_caption_chars,
               round(avg(repetition_3gram), 4)                                 AS mean_repetition,
               round(avg(CASE WHEN repetition_3gram > 0.5 THEN 1.0 ELSE 0.0 END), 4) AS looping_share,
               round(avg(refusal), 4)                                          AS refusal_share,
               round(avg(empty), 4)                                            AS empty_share,
               round(avg(merged), 4)                                           AS merged_share,
               sum(alt_entities)::BIGINT                                       AS alt_entities,
               sum(entities_kept)::BIGINT                                      AS entities_kept,
               round(sum(entities_kept) / nullif(sum(alt_entities), 0), 4)     AS entity_survival
        FROM v_recaption_scores GROUP BY source ORDER BY source
    """,
    # The alt-text entities that survive the rewrite, per shard (and so per run and model).
    "v_entity_survival": """
        SELECT source, shard, count(*) AS samples,
               count(alt_entities)                                          AS samples_with_entities,
               sum(alt_entities)::BIGINT                                    AS alt_entities,
               sum(entities_kept)::BIGINT                                   AS entities_kept,
               round(sum(entities_kept) / nullif(sum(alt_entities), 0), 4)  AS entity_survival
        FROM v_recaption_scores GROUP BY source, shard ORDER BY source, shard
    """,
    # Curation (`blip3 curate`): kept and dropped samples per source and rule.
    "v_curation": """
        SELECT source, rule,
               count(*)                          AS evaluated,
               count(*) FILTER (WHERE kept)      AS kept,
               count(*) FILTER (WHERE NOT kept)  AS dropped,
               round(count(*) FILTER (WHERE NOT kept) / count(*), 4) AS drop_share
        FROM sample_decisions GROUP BY ALL ORDER BY source, rule
    """,
    # The reasons behind the drops, most common first ("exact copy of ...", "min_side 120 below 200").
    "v_curation_reasons": """
        SELECT source, rule, regexp_replace(reason, '[0-9.]+', '#', 'g') AS reason, count(*) AS n
        FROM sample_decisions WHERE NOT kept
        GROUP BY ALL ORDER BY source, rule, n DESC
    """,
    # Score histograms: 20 equal-width bins per score between its min and max over all sources.
    "v_score_histograms": """
        WITH r AS (SELECT name, min(value) AS lo, max(value) AS hi FROM sample_scores GROUP BY name),
        b AS (
            SELECT s.source, s.name, r.lo, r.hi,
                   CASE WHEN r.hi = r.lo THEN 0 ELSE least(floor((s.value - r.lo) / (r.hi - r.lo) * 20), 19) END AS bin
            FROM sample_scores s JOIN r USING (name)
        )
        SELECT source, name, bin::INTEGER AS bin,
               lo + bin * (hi - lo) / 20 AS value_from, lo + (bin + 1) * (hi - lo) / 20 AS value_to,
               count(*) AS n
        FROM b GROUP BY ALL ORDER BY source, name, bin
    """,
    # Duplicate clusters side by side: every member of every cluster of more than one sample.
    "v_duplicate_clusters": """
        SELECT rule, cluster, count(*) OVER (PARTITION BY rule, cluster) AS size, kept, source, shard, key, reason
        FROM sample_decisions WHERE cluster IS NOT NULL
        ORDER BY rule, cluster, kept DESC, source, shard, key
    """,
    # Training samples that are also benchmark images, by task: "which training images are in TextVQA".
    "v_contamination": """
        SELECT task, source, count(DISTINCT shard || '#' || key) AS samples, count(DISTINCT image) AS images,
               sum(len(question_ids)) AS questions
        FROM benchmark_matches GROUP BY ALL ORDER BY task, source
    """,
    # Each mixture's plan per source: target vs realised weight, effective epochs, tokens.
    # realised_weight is the planned share in the unit the mixture is weighted by (samples or tokens).
    "v_mixture_sources": """
        SELECT ms.mixture, ms.source, ms.kind,
               round(ms.weight, 6)                                                       AS target_weight,
               round(CASE WHEN m.weight_by = 'tokens'
                          THEN ms.target_tokens / sum(ms.target_tokens) OVER (PARTITION BY ms.mixture)
                          ELSE ms.target_samples / sum(ms.target_samples) OVER (PARTITION BY ms.mixture)
                     END, 6)                                                              AS realised_weight,
               round(ms.target_samples / sum(ms.target_samples) OVER (PARTITION BY ms.mixture), 6) AS sample_share,
               round(ms.target_tokens / sum(ms.target_tokens) OVER (PARTITION BY ms.mixture), 6)   AS token_share,
               ms.available_samples, ms.target_samples AS planned_samples,
               ms.available_tokens, ms.target_tokens AS planned_tokens,
               round(ms.epochs, 4)                                                       AS epochs,
               ms.n_shards, ms.tokenizer
        FROM mixture_sources ms JOIN mixtures m ON m.name = ms.mixture
        ORDER BY ms.mixture, ms.weight DESC, ms.source
    """,
    "v_mixture_weights": """
        SELECT mixture, source, target_weight, realised_weight,
               round(realised_weight - target_weight, 6) AS weight_error, epochs
        FROM v_mixture_sources
    """,
    # One line per mixture: totals and the largest number of epochs any source is repeated.
    "v_mixture_summary": """
        SELECT m.name AS mixture, m.weight_by, m.seed, count(ms.source) AS sources,
               sum(ms.target_samples) AS samples, sum(ms.target_tokens) AS tokens,
               round(max(ms.epochs), 4) AS max_epochs, m.manifest_path, m.created_at
        FROM mixtures m LEFT JOIN mixture_sources ms ON ms.mixture = m.name
        GROUP BY ALL ORDER BY m.name
    """,
    # Benchmark results with the run that trained the checkpoint and the mixture it trained on
    # (a run names its mixture by name or by the manifest file's path).
    "v_evals": """
        SELECT e.task, e.shots, e.metric, e.value, e.n, e.checkpoint, e.run_id, r.stage,
               m.name AS mixture, e.evaluated_at, e.predictions_path
        FROM evals e
        LEFT JOIN runs r ON r.run_id = e.run_id
        LEFT JOIN mixtures m ON m.name = r.manifest OR m.manifest_path = r.manifest
        ORDER BY e.task, e.shots, e.metric, e.checkpoint
    """,
    # Each result beside the sources of the mixture behind it: share of samples and tokens, and
    # the source's OCR / object coverage. "Which sources went into the model that scored X?"
    "v_eval_sources": """
        SELECT e.task, e.shots, e.metric, e.value, e.n, e.mixture, e.stage, e.run_id, e.checkpoint,
               ms.source, ms.sample_share, ms.token_share, c.text_share AS ocr_share, c.object_share
        FROM v_evals e
        JOIN v_mixture_sources ms ON ms.mixture = e.mixture
        LEFT JOIN v_coverage c ON c.source = ms.source
        ORDER BY e.task, e.metric, e.mixture, ms.sample_share DESC
    """,
    # One line per result and mixture: the share of the mixture's samples that show text (OCR
    # found some), e.g. "TextVQA accuracy by OCR share in the pretrain mixture".
    "v_eval_mixture": """
        SELECT task, shots, metric, value, n, mixture, stage, run_id, checkpoint,
               round(sum(sample_share * coalesce(ocr_share, 0)), 6)    AS mixture_ocr_share,
               round(sum(sample_share * coalesce(object_share, 0)), 6) AS mixture_object_share,
               count(source)                                            AS sources
        FROM v_eval_sources
        GROUP BY ALL ORDER BY task, metric, mixture_ocr_share
    """,
}


def create_views(con: duckdb.DuckDBPyConnection) -> None:
    for name, body in VIEWS.items():
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {body}")
