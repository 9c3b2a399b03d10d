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

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from blip3.core.catalog import SOURCE_KINDS, Catalog, transaction
from blip3.core.errors import UserError
from blip3.core.records import RecordError, image_members, record_kind, sidecar_row
from blip3.core.shards import SampleRow, ShardInfo, file_sha256, iter_shard, list_shards, rows_to_table
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


def resolve_shards(spec: str | Path, base: Path | None = None) -> list[Path]:
    """Tars named by a folder (its finished shards if written by us, else its `*.tar`, else
    recursively), a file, a glob or a brace pattern."""
    from braceexpand import braceexpand

    text = str(spec)
    paths: list[Path] = []
    for part in braceexpand(text):
        p = Path(part)
        if base is not None and not p.is_absolute():
            p = base / p
        if any(c in part for c in "*?["):
            paths += [Path(x) for x in sorted(glob.glob(str(p), recursive=True)) if x.endswith(".tar")]
        elif p.is_dir() and _our_layout(p):  # only finished shards (a stats file marks them)
            paths += [info.tar for info in list_shards(p)]
        elif p.is_dir():
            paths += sorted(p.glob("*.tar")) or sorted(p.rglob("*.tar"))
        elif p.is_file():
            paths.append(p)
        else:
            raise UserError("no such file or folder", file=p)
    if not paths:
        raise UserError("no .tar shards found", file=text)
    return [p.resolve() for p in paths]


def scan_shard(tar: str | Path, kind: str, counter: TokenCounter, *, rows: bool = False,
               checksum: bool = False) -> ShardScan:
    """Read one tar: samples, tokens (and `samples` rows when `rows`, its sha256 when `checksum`:
    hashing reads the whole tar again, so only callers that use the value ask for it)."""
    tar = Path(tar)
    record = record_kind(kind)
    n = tokens = 0
    out_rows: list[SampleRow] = []
    try:
        for sample in iter_shard(tar):
            key = sample["__key__"]
            try:
                rec = json.loads(sample["json"]) if "json" in sample else {}
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UserError(f"sample {key}: {key}.json is not valid JSON", file=tar) from None
            try:
                record.validate(rec, sample)
            except RecordError as e:
                raise UserError(f"sample {key}: {e} (kind {kind}, see docs/formats.md)", file=tar) from None
            txt = sample["txt"].decode("utf-8", errors="replace") if "txt" in sample else None
            tokens += counter.sample(kind, rec, txt, len(image_members(sample)))
            n += 1
            if rows:
                out_rows.append(sidecar_row(kind, key, rec, sample, txt))
    except (OSError, EOFError) as e:  # tarfile raises these on truncated/corrupt archives
        raise UserError(f"cannot read tar: {' '.join(str(e).split())}", file=tar) from None
    sha = file_sha256(tar) if checksum else None
    return ShardScan(str(tar.resolve()), sha, tar.stat().st_size, n, tokens, out_rows)


def _our_layout(path: Path) -> bool:
    """True for a folder written by `core.shards.ShardWriter` (stats files with sha256)."""
    if not path.is_dir():
        return False
    try:
        return bool(list_shards(path))
    except (KeyError, ValueError, TypeError):  # someone else's *_stats.json (img2dataset's)
        return False


@dataclass
class SourceResult:
    name: str
    kind: str
    shards: int
    samples: int
    tokens: int
    tokenizer: str
    added: int


def add_source(cat: Catalog, name: str, path: str | Path, kind: str, counter: TokenCounter) -> SourceResult:
    """Register a source (idempotent: shards already catalogued with the same sha256 keep their rows;
    tokens are recounted only for shards without a count or when the tokenizer changed)."""
    if kind not in SOURCE_KINDS:
        raise UserError(f"unknown kind {kind!r}; one of {', '.join(SOURCE_KINDS)}", field="--kind")
    p = Path(path)
    ours = _our_layout(p)
    tars = [str(t) for t in resolve_shards(path)]  # our layout: its finished shards
    taken = cat.con.execute(
        "SELECT path, source FROM shards WHERE source <> ? AND path IN (SELECT unnest(?::VARCHAR[]))", [name, tars]
    ).fetchone()
    if taken:
        raise UserError(f"shard {taken[0]} already belongs to source {taken[1]!r} (a shard is in one source)",
                        field="NAME")
    con = cat.con
    row = con.execute("SELECT meta FROM sources WHERE name = ?", [name]).fetchone()
    meta = json.loads(row[0] or "{}") if row else {}
    recount = "tokenizer" in meta and (
        meta["tokenizer"] != counter.label or meta.get("vision_tokens_per_image") != counter.vision_tokens_per_image)
    if ours:
        # Read (and check against the kind) every shard that needs a token count *before* writing
        # anything, so a wrong --kind leaves the catalog as it was.
        counted = {r[0] for r in con.execute(
            "SELECT path FROM shards WHERE source = ? AND n_tokens IS NOT NULL", [name]).fetchall()}
        tokens = {t: scan_shard(t, kind, counter).tokens for t in tars if recount or t not in counted}
        added = cat.add_output(p, source=name, kind=kind).added
        for tar, n in tokens.items():
            con.execute("UPDATE shards SET n_tokens = ? WHERE path = ?", [n, tar])
    else:
        cat.upsert_source(name, kind, p)
        try:
            added = _add_foreign(cat, name, [Path(t) for t in tars], kind, counter)
        except UserError:
            if row is None:  # a source that failed on its first add leaves no empty row behind
                con.execute("DELETE FROM sources WHERE name = ?", [name])
            raise
        if recount:  # shards kept from an earlier add were counted with another tokenizer
            for (tar,) in con.execute("SELECT path FROM shards WHERE source = ? AND status = 'ok'", [name]).fetchall():
                con.execute("UPDATE shards SET n_tokens = ? WHERE path = ?", [scan_shard(tar, kind, counter).tokens, tar])
    meta.update(tokenizer=counter.label, token_count="exact" if counter.exact else "estimate",
                vision_tokens_per_image=counter.vision_tokens_per_image)
    con.execute("UPDATE sources SET meta = ? WHERE name = ?", [json.dumps(meta), name])
    cat._refresh_source_counts(name)
    row = con.execute("SELECT n_shards, n_samples, coalesce(n_tokens, 0) FROM sources WHERE name = ?", [name]).fetchone()
    return SourceResult(name, kind, row[0], row[1], row[2], counter.label, added)


def _add_foreign(cat: Catalog, name: str, tars: list[Path], kind: str, counter: TokenCounter) -> int:
    """Scan every new (or changed) tar first, then insert them all in one transaction: a bad
    sample in any tar leaves the catalog as it was, with no rows of the tars read before it."""
    con = cat.con
    scans: list[tuple[str, ShardInfo, pa.Table, int]] = []
    for i, tar in enumerate(tars):
        path = str(tar)
        sha = file_sha256(tar)
        known = con.execute("SELECT sha256 FROM shards WHERE path = ?", [path]).fetchone()
        if known is not None and known[0] == sha:
            continue
        scan = scan_shard(tar, kind, counter, rows=True)
        # no sidecar parquet or stats file: the rows derived from the members are passed instead
        info = ShardInfo(index=i, tar=tar, parquet=None, stats=None, sha256=sha, tar_bytes=scan.bytes,
                         count=scan.samples, successes=scan.samples, failed=0, generator={"name": "external"})
        scans.append((path, info, rows_to_table(scan.rows), scan.tokens))
    with transaction(con):
        for path, info, rows, tokens in scans:
            cat._insert_shard(path, name, info, rows=rows, n_tokens=tokens)
    return len(scans)
