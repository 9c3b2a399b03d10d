"""Per-sample quality scores of recaptioned shards into the catalog (`sample_scores`).

The annotator stores each sample's scores in its record (`metadata.scores`,
datagen/recaption_quality.py); after the job, `register_scores` reads them back from the
source's catalogued shards and writes them to the catalog, one row per (shard, key, score).
Only the `.json` members are read: the tar is opened seekable, so image members are skipped, not
read. A shard whose scores were read from a tar of the same sha256 is not read again, so a re-run
or a resumed job costs only its new shards; a shard rewritten (`--overwrite`) gets its rows
replaced. Object-store shards are read through fsspec.
"""

from __future__ import annotations

import json
import tarfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from blip3.core.logs import get_logger

log = get_logger("datagen")


@contextmanager
def _open_tar(path: str) -> Iterator[IO[bytes]]:
    if "://" in path:
        import fsspec

        with fsspec.open(path, "rb") as f:
            yield f
    else:
        with open(path, "rb") as f:
            yield f


def shard_scores(path: str) -> list[tuple[str, str, float]]:
    """`(key, name, value)` of every sample's `metadata.scores` in one shard tar."""
    rows: list[tuple[str, str, float]] = []
    with _open_tar(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".json"):
                continue
            record = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
            scores = (record.get("metadata") or {}).get("scores") or {}
            key = str(record.get("key") or member.name[: -len(".json")])
            rows += [(key, name, float(value)) for name, value in sorted(scores.items())
                     if isinstance(value, (int, float)) and not isinstance(value, bool)]
    return rows


def register_scores(db: str | Path | None, source: str) -> int:
    """Catalog the scores of every shard of `source` not yet scored at its sha256; returns how many
    shards were read."""
    from blip3.core.catalog import Catalog

    with Catalog(db) as cat:
        done = cat.scored_shards(source)
        todo = [s for s in cat.source_shards(source, ok_only=True) if done.get(s.path) != s.sha256]
        for shard in todo:
            cat.replace_scores(source, shard.path, shard.sha256, shard_scores(shard.path))
    if todo:
        log.info(f"{source}: scores of {len(todo)} shard(s) catalogued")
    return len(todo)
