"""Per-sample quality scores of recaptioned shards into the catalog (`sample_scores`, the table
`blip3 curate` writes its scores to: `v_score_histograms` and curation thresholds see them too).

The annotator stores each sample's scores in its record (`metadata.scores`,
datagen/recaption_quality.py); after the job, `register_scores` reads them back from the
source's catalogued shards and writes them to the catalog, one row per (shard, key, score),
replacing only the names in SCORE_NAMES (`core.curation.replace_rows`).
Only the `.json` members are read: the tar is opened seekable, so image members are skipped, not
read. A shard whose scores were read from a tar of the same sha256 (in the rows' `generator`) is not read again, so a re-run
or a resumed job costs only its new shards; a shard rewritten (`--overwrite`) gets its rows
replaced. Object-store shards are read through fsspec.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from blip3.core.logs import get_logger
from blip3.core.storage import Location

log = get_logger("datagen")


def shard_scores(path: str) -> list[tuple[str, str, float]]:
    """`(key, name, value)` of every sample's `metadata.scores` in one shard tar."""
    rows: list[tuple[str, str, float]] = []
    with Location(path).open() as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".json"):
                continue
            record = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
            scores = (record.get("metadata") or {}).get("scores") or {}
            key = str(record.get("key") or member.name[: -len(".json")])
            rows += [(key, name, float(value)) for name, value in sorted(scores.items())
                     if isinstance(value, (int, float)) and not isinstance(value, bool)]
    return rows


#: The names `register_scores` writes (and replaces), beside the other scores of `sample_scores`.
SCORE_NAMES = ("length_chars", "length_words", "repetition_3gram", "empty", "refusal", "merged", "alt_entities",
               "entities_kept", "entity_survival")


def scores_generator(sha256: str) -> str:
    """The `generator` column of a shard's score rows: what computed them, from which tar."""
    from blip3.datagen.recaption import ENGINE_VERSION

    return f"blip3-recaption {ENGINE_VERSION}, tar sha256:{sha256[:16]}"


def register_scores(db: str | Path | None, source: str) -> int:
    """Catalog the scores of every shard of `source` not yet scored from its current tar (its sha256
    in the rows' `generator`); returns how many shards were read. Other scores of the same samples
    (`blip3 curate`'s) are left as they are."""
    import pyarrow as pa

    from blip3.core.catalog import Catalog
    from blip3.core.curation import replace_rows, score_generators

    with Catalog(db) as cat:
        done = score_generators(cat.con, source, "merged")
        todo = [s for s in cat.source_shards(source, ok_only=True) if done.get(s.path) != scores_generator(s.sha256)]
        for shard in todo:
            rows = shard_scores(shard.path)
            table = pa.table({"source": [source] * len(rows), "shard": [shard.path] * len(rows),
                              "key": [r[0] for r in rows], "name": [r[1] for r in rows],
                              "value": pa.array([r[2] for r in rows], pa.float64()),
                              "generator": [scores_generator(shard.sha256)] * len(rows)})
            replace_rows(cat.con, "sample_scores", table, [shard.path], SCORE_NAMES)
    if todo:
        log.info(f"{source}: scores of {len(todo)} shard(s) catalogued")
    return len(todo)
