"""Shard plans: a datagen job's input cut, lazily and deterministically, into output shards.

A plan is the unit of work of `datagen.pipeline`: output shard `index` holds input samples
`index*S .. index*S+S-1` (enumeration order of `inputs.iter_raw_refs`, `S` = `--shard-size`),
as light refs (locators, not bytes). Plans are produced one at a time from the streamed
enumeration, so the driver holds the refs of the shards in flight only, never the whole input:
its memory grows with `--shard-size` times the in-flight shards, not with the job.

Keys are made safe (`core.keys.sanitize_key`) and unique within their shard (`a`, `a_1`, ...),
which is all a tar needs; keeping every key of a 200M-sample job to make them unique job-wide
would put the whole input back in the driver's memory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from itertools import islice
from typing import Any, Iterable, Iterator

from blip3.core.errors import UserError
from blip3.datagen.inputs import SampleRef, _KeyDeduper


@dataclass
class ShardPlan:
    """One output shard's inputs, and the fingerprint a finished shard must carry to be reused."""

    index: int
    refs: list[SampleRef]
    digest: str


def input_digest(refs: Iterable[SampleRef], generator: dict[str, Any] | None = None) -> str:
    """A fingerprint of a shard's inputs and of the annotator's settings: a finished shard is reused
    only for the same inputs annotated the same way (changing e.g. `--min-confidence` redoes it)."""
    h = hashlib.sha256(json.dumps(generator or {}, sort_keys=True, default=str).encode())
    for r in refs:
        h.update(json.dumps([r.key, r.ext, r.uid, r.url, r.source_caption, r.error]).encode())
    return h.hexdigest()


def iter_plans(refs: Iterable[SampleRef], shard_size: int, generator: dict[str, Any] | None = None,
               *, limit: int | None = None) -> Iterator[ShardPlan]:
    """Cut `refs` (raw keys, stable order) into plans of `shard_size`, pulling one shard's refs at a
    time; `limit` keeps only the first N refs."""
    if shard_size < 1:
        raise UserError("must be at least 1", field="--shard-size")
    if limit is not None and limit < 1:
        raise UserError("must be at least 1", field="--limit")
    it = iter(refs) if limit is None else islice(refs, limit)
    index = 0
    while chunk := list(islice(it, shard_size)):
        dedup = _KeyDeduper()
        for ref in chunk:
            ref.key = dedup(ref.key)
        yield ShardPlan(index, chunk, input_digest(chunk, generator))
        index += 1
