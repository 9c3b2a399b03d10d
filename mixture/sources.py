"""Sources: folders (or globs, or brace patterns) of WebDataset tars of one kind, scanned and
registered in the catalog with their shards, checksums, sample and token counts.

Two shapes of folder are accepted:
- ours (`core.shards` layout, `NNNNNN_stats.json` beside each tar): registered through
  `Catalog.add_output`, so failed inputs from the sidecars land in `samples` too;
- any other WebDataset tars (img2dataset output, downloaded shards): each tar is read once and a
  `samples` row is derived per sample from its members (`core.records.sidecar_row`); failures
  are unknown there, so none are recorded.
Either way each shard's tokens are counted by reading it (`mixture.tokens.TokenCounter`), and a
sample whose record does not fit its kind (`core.records`: an interleaved sample without
`texts`/`images`, ...) is one clear error naming the sample and the tar.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from blip3.core.catalog import SOURCE_KINDS, Catalog
from blip3.core.errors import UserError
from blip3.core.records import RecordError, image_members, record_kind, sidecar_row
from blip3.core.shards import SampleRow, Shard, iter_shard, resolve_shards, rows_to_table
from blip3.core.storage import Location
from blip3.mixture.tokens import TokenCounter


@dataclass
class ShardScan:
    """What reading one tar found."""

    path: str
    sha256: str | None  # only when asked for (`checksum=True`)
    bytes: int
    samples: int
    tokens: int
    rows: list[SampleRow] = field(default_factory=list)


def scan_shard(tar: str | Path | Location, kind: str, counter: TokenCounter, *, rows: bool = False,
               checksum: bool = False, storage_options: dict[str, Any] | None = None) -> ShardScan:
    """Read one tar, local or on an object store (`storage_options` for its filesystem): samples,
    tokens (and `samples` rows when `rows`, its sha256 when `checksum`: hashing reads the whole
    tar again, so only callers that use the value ask for it)."""
    where = Location(tar, storage_options)
    location = where.url
    record = record_kind(kind)
    n = tokens = 0
    out_rows: list[SampleRow] = []
    try:
        with where.open() as f:
            for sample in iter_shard(location, fileobj=f):
                key = sample["__key__"]
                try:
                    rec = json.loads(sample["json"]) if "json" in sample else {}
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise UserError(f"sample {key}: {key}.json is not valid JSON", file=location) from None
                try:
                    record.validate(rec, sample)
                except RecordError as e:
                    raise UserError(f"sample {key}: {e} (kind {kind}, see docs/formats.md)", file=location) from None
                txt = sample["txt"].decode("utf-8", errors="replace") if "txt" in sample else None
                tokens += counter.sample(kind, rec, txt, len(image_members(sample)))
                n += 1
                if rows:
                    out_rows.append(sidecar_row(kind, key, rec, sample, txt))
    except (OSError, EOFError, tarfile.TarError) as e:  # truncated/corrupt archives, a vanished object
        raise UserError(f"cannot read tar: {' '.join(str(e).split())}", file=location) from None
    sha = where.sha256() if checksum else None
    return ShardScan(location, sha, where.size() or 0, n, tokens, out_rows)


@dataclass
class SourceResult:
    name: str
    kind: str
    shards: int
    samples: int
    tokens: int
    tokenizer: str
    added: int


def add_source(cat: Catalog, name: str, path: str | Path, kind: str, counter: TokenCounter,
               storage_options: dict[str, Any] | None = None) -> SourceResult:
    """Register a source (idempotent: shards already catalogued with the same sha256 keep their rows;
    tokens are recounted only for shards without a count or when the tokenizer changed). `path` is
    local or on any fsspec filesystem (`storage_options` for it)."""
    if kind not in SOURCE_KINDS:
        raise UserError(f"unknown kind {kind!r}; one of {', '.join(SOURCE_KINDS)}", field="--kind")
    p = Location(path, storage_options)
    ours = "{" not in str(path) and not any(c in str(path) for c in "*?[") and bool(p.finished())
    tars = resolve_shards(path, storage_options=storage_options)  # our layout: its finished shards
    taken = cat.shard_owner(tars, other_than=name)
    if taken:
        raise UserError(f"shard {taken[0]} already belongs to source {taken[1]!r} (a shard is in one source)",
                        field="NAME")
    known = cat.source(name)
    meta = known.meta if known else {}
    recount = "tokenizer" in meta and (
        meta["tokenizer"] != counter.label or meta.get("vision_tokens_per_image") != counter.vision_tokens_per_image)
    if ours:
        # Read (and check against the kind) every shard that needs a token count *before* writing
        # anything, so a wrong --kind leaves the catalog as it was.
        counted = {s.path for s in cat.source_shards(name, counted_only=True)}
        tokens = {t: scan_shard(t, kind, counter, storage_options=storage_options).tokens
                  for t in tars if recount or t not in counted}
        added = cat.add_output(p, source=name, kind=kind).check().added
        cat.set_shard_tokens(tokens)
    else:
        cat.upsert_source(name, kind, p)
        try:
            added = _add_foreign(cat, name, [Location(t, storage_options) for t in tars], kind, counter)
        except UserError:
            if known is None:  # a source that failed on its first add leaves no empty row behind
                cat.drop_source(name)
            raise
        if recount:  # shards kept from an earlier add were counted with another tokenizer
            cat.set_shard_tokens({s.path: scan_shard(s.path, kind, counter, storage_options=storage_options).tokens
                                  for s in cat.source_shards(name, ok_only=True)})
    meta.update(tokenizer=counter.label, token_count="exact" if counter.exact else "estimate",
                vision_tokens_per_image=counter.vision_tokens_per_image)
    cat.set_source_meta(name, meta)
    cat.refresh_source_counts(name)
    row = cat.source(name)
    return SourceResult(name, kind, row.n_shards, row.n_samples, row.n_tokens or 0, counter.label, added)


def _add_foreign(cat: Catalog, name: str, tars: list[Location], kind: str, counter: TokenCounter) -> int:
    """Scan every new (or changed) tar first, then insert them all in one transaction: a bad
    sample in any tar leaves the catalog as it was, with no rows of the tars read before it."""
    scans: list[tuple[Shard, pa.Table, int]] = []
    for i, tar in enumerate(tars):
        sha = tar.sha256()
        if cat.shard_sha256(tar.url) == sha:
            continue
        scan = scan_shard(tar, kind, counter, rows=True)
        # no sidecar parquet or stats file: the rows derived from the members are passed instead
        info = Shard(index=i, tar=tar.url, parquet=None, stats=None, sha256=sha, tar_bytes=scan.bytes,
                         count=scan.samples, successes=scan.samples, failed=0, generator={"name": "external"})
        scans.append((info, rows_to_table(scan.rows), scan.tokens))
    return cat.add_shards(name, scans)
