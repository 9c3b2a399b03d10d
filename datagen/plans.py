"""Shard plans: a datagen job's input cut, lazily and deterministically, into output shards.

A plan is the unit of work of `datagen.pipeline`: output shard `index` holds input samples
`index*S .. index*S+S-1` (enumeration order of `inputs.iter_raw_refs`, `S` = `--shard-size`).

Two ways to the same shards:
- Which way an input goes is its reader's (`inputs.READERS`); local and object-store inputs go
  the same way.
- Folders and URL lists are listed by the driver as light refs (locators,
  not bytes), one shard's refs at a time (`iter_plans`): its memory grows with `--shard-size`
  times the shards in flight, not with the job.
- Tars (`webdataset` inputs) are not read by the driver at all. Ray tasks near the data count each
  tar's refs from its headers (`inputs.count_tar`, in parallel, with a progress bar); from the
  counts alone the driver cuts the tars' concatenation into plans of tar ranges (`TarSpan`,
  `iter_tar_plans`), and the task writing a shard reads its ranges' refs itself. The cut is the
  one `iter_plans` makes over the same tars, so the shards are byte-identical either way. Why
  counts first rather than "one tar -> k shards": shard `i` stays samples `i*S..`, whatever the
  tars' sizes, so shards stay full and a corpus re-packed into other tars keeps its shards.
  A count also records where a scan may resume (a header offset every `S` refs), so a shard's
  task reads fewer than `2*S` headers of its tar, not every header before its range.
- img2dataset folders the same way, one part (`NNNNN.parquet` + its tar) per count: a part's
  refs are its parquet rows (the count is the parquet footer's row count); a shard's task reads
  the parts it covers whole (rows sorted by key), then keeps its range.

Keys are made safe (`core.keys.sanitize_key`) and unique within their shard (`a`, `a_1`, ...),
which is all a tar needs; keeping every key of a 200M-sample job to make them unique job-wide
would put the whole input back in the driver's memory.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Sequence

from blip3.core.errors import UserError
from blip3.core.logs import progress
from blip3.core.storage import Location, storage_environment
from blip3.datagen.inputs import SampleRef, TarCount, TarSource, _KeyDeduper, count_tar, iter_tar_range, reader_for

#: Counts one job's tars into one list: `(tars, every) -> [TarCount]`, in the tars' order.
TarCounter = Callable[[Sequence[TarSource], int], list[TarCount]]


@dataclass(frozen=True)
class TarSpan:
    """Refs `start .. stop-1` of one input tar of `size` bytes, scanned from `seek` (`TarCount.seeks`)."""

    tar: TarSource
    start: int
    stop: int
    size: int
    seek: tuple[int, int] = (0, 0)
    stamp: str = ""  # the tar's `TarCount.stamp`: its member headers' digest


class ShardPlan:
    """One output shard's inputs, and the fingerprint a finished shard must carry to be reused.

    The refs are either given (listed by the driver) or read from `spans` of input tars on first
    use of `refs`, which happens in the task writing the shard: a plan of spans travels to it as a
    few numbers per tar, and the driver never opens those tars."""

    def __init__(self, index: int, refs: list[SampleRef] | None = None, digest: str = "",
                 spans: tuple[TarSpan, ...] = ()):
        self.index = index
        self.digest = digest
        self.spans = spans
        self._refs = refs

    @property
    def size(self) -> int:
        """How many refs the plan holds, known without reading its tars."""
        return len(self._refs) if self._refs is not None else sum(s.stop - s.start for s in self.spans)

    @property
    def refs(self) -> list[SampleRef]:
        if self._refs is None:
            self._refs = _unique_keys([ref for s in self.spans for ref in iter_tar_range(s.tar, s.start, s.stop, s.seek, s.size)])
        return self._refs


def _unique_keys(refs: list[SampleRef]) -> list[SampleRef]:
    dedup = _KeyDeduper()
    for ref in refs:
        ref.key = dedup(ref.key)
    return refs


def _generator_hash(generator: dict[str, Any] | None) -> "hashlib._Hash":
    return hashlib.sha256(json.dumps(generator or {}, sort_keys=True, default=str).encode())


def input_digest(refs: Iterable[SampleRef], generator: dict[str, Any] | None = None) -> str:
    """A fingerprint of a shard's inputs and of the annotator's settings: a finished shard is reused
    only for the same inputs annotated the same way (changing e.g. `--min-confidence` redoes it)."""
    h = _generator_hash(generator)
    for r in refs:
        h.update(json.dumps([r.key, r.ext, r.uid, r.url, r.source_caption, r.error, r.stamp]).encode())
    return h.hexdigest()


def spans_digest(spans: Iterable[TarSpan], generator: dict[str, Any] | None = None) -> str:
    """`input_digest` of a plan of tar ranges, from what the driver knows without reading the tars:
    each tar's name, size and member headers' digest (counted by tasks near the data), and the
    range. The location is left out, so a corpus moved (say, to an object store) keeps its
    finished shards; a tar rewritten (other members, sizes or times) gets its shards redone."""
    h = _generator_hash(generator)
    for s in spans:
        h.update(json.dumps(["tar", s.tar.name, s.size, s.start, s.stop, s.stamp]).encode())
    return h.hexdigest()


def _check_sizes(shard_size: int, limit: int | None) -> None:
    if shard_size < 1:
        raise UserError("must be at least 1", field="--shard-size")
    if limit is not None and limit < 1:
        raise UserError("must be at least 1", field="--limit")


def iter_plans(refs: Iterable[SampleRef], shard_size: int, generator: dict[str, Any] | None = None,
               *, limit: int | None = None) -> Iterator[ShardPlan]:
    """Cut `refs` (raw keys, stable order) into plans of `shard_size`, pulling one shard's refs at a
    time; `limit` keeps only the first N refs."""
    _check_sizes(shard_size, limit)
    it = iter(refs) if limit is None else islice(refs, limit)
    index = 0
    while chunk := list(islice(it, shard_size)):
        yield ShardPlan(index, _unique_keys(chunk), input_digest(chunk, generator))
        index += 1


def iter_tar_plans(tars: Sequence[TarSource], counts: Sequence[TarCount], shard_size: int,
                   generator: dict[str, Any] | None = None, *, limit: int | None = None) -> Iterator[ShardPlan]:
    """The plans `iter_plans` would cut from the refs of `tars`, made from their `counts` alone: each
    plan is the tar ranges (`TarSpan`) its refs come from. An unreadable tar is one UserError."""
    _check_sizes(shard_size, limit)
    left = limit if limit is not None else float("inf")
    index, spans, filled = 0, [], 0
    for tar, count in zip(tars, counts):
        if count.error:
            raise UserError(count.error)
        n, pos = int(min(count.refs, left)), 0
        left -= n
        firsts = [s[0] for s in count.seeks]
        while pos < n:
            take = min(shard_size - filled, n - pos)
            seek = count.seeks[bisect.bisect_right(firsts, pos) - 1]
            spans.append(TarSpan(tar, pos, pos + take, count.size, seek, count.stamp))
            pos, filled = pos + take, filled + take
            if filled == shard_size:
                yield ShardPlan(index, digest=spans_digest(spans, generator), spans=tuple(spans))
                index, spans, filled = index + 1, [], 0
        if left <= 0:
            break
    if spans:
        yield ShardPlan(index, digest=spans_digest(spans, generator), spans=tuple(spans))


def count_tars_locally(tars: Sequence[TarSource], every: int) -> list[TarCount]:
    """A `TarCounter` in this process (tests, small jobs without a cluster)."""
    return [count_tar(t, every) for t in tars]


def count_tars_on_ray(tars: Sequence[TarSource], every: int) -> list[TarCount]:
    """A `TarCounter` of Ray tasks (Ray must be initialised): the tars are counted in parallel on
    the cluster, a few per CPU at a time, with a progress bar; the driver reads no tar."""
    import ray

    env = storage_environment()  # a store's settings reach the counting tasks as they reach us
    task = ray.remote(count_tar).options(**({"runtime_env": {"env_vars": env}} if env else {}))
    window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    counts: list[TarCount | None] = [None] * len(tars)
    waiting: dict[Any, int] = {}
    todo = iter(enumerate(tars))
    with progress() as bar:
        shown = bar.add_task("counting input tars", total=len(tars))
        while True:
            for i, tar in islice(todo, window - len(waiting)):
                waiting[task.remote(tar, every)] = i
            if not waiting:
                break
            done, _ = ray.wait(list(waiting), num_returns=1)
            for ref in done:
                counts[waiting.pop(ref)] = ray.get(ref)
                bar.advance(shown)
    return counts  # type: ignore[return-value]


def job_plans(input: str, input_format: str | None, shard_size: int, generator: dict[str, Any] | None = None, *,
              limit: int | None = None, storage_options: dict[str, Any] | None = None,
              count_tars: TarCounter = count_tars_on_ray) -> Iterator[ShardPlan]:
    """The plans of a job's input, local or on any fsspec filesystem: the reader of its kind
    (`inputs.READERS`) names its tars, planned through `count_tars` and `iter_tar_plans`, or lists
    its refs in the driver, planned through `iter_plans`."""
    where = Location(input, storage_options)
    reader = reader_for(where, input_format)
    tars = reader.tars(where)
    if tars is None:
        yield from iter_plans(reader.refs(where), shard_size, generator, limit=limit)
        return
    _check_sizes(shard_size, limit)
    yield from iter_tar_plans(tars, count_tars(tars, shard_size), shard_size, generator, limit=limit)
