"""Sources: folders (or globs, or brace patterns) of WebDataset tars of one kind, scanned and
registered in the catalog with their shards, checksums, sample and token counts.

Two shapes of folder are accepted:
- ours (`core.shards` layout, `NNNNNN_stats.json` beside each tar): registered through
  `Catalog.add_output`, so failed inputs from the sidecars land in `samples` too;
- any other WebDataset tars (img2dataset output, downloaded shards): each tar is read once and a
  `samples` row is derived per sample from its members (sizes, caption length, OCR entries,
  objects); failures are unknown there, so none are recorded.
Either way each shard's tokens are counted by reading it (`mixture.tokens.TokenCounter`), and a
sample whose record does not fit its kind (an interleaved sample without `texts`/`images`, ...)
is one clear error naming the sample and the tar.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from blip3.core.catalog import SOURCE_KINDS, Catalog, transaction
from blip3.core.errors import UserError
from blip3.core.shards import SIDECAR_SCHEMA, ShardInfo, file_sha256, iter_shard, list_shards
from blip3.mixture.tar_index import is_image_ext
from blip3.mixture.tokens import TokenCounter


@dataclass
class ShardScan:
    """What reading one tar found."""

    path: str
    sha256: str | None  # only when asked for (`checksum=True`)
    bytes: int
    samples: int
    tokens: int
    rows: list[dict[str, Any]] = field(default_factory=list)


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


def _check_record(kind: str, key: str, rec: dict, sample: dict, tar: Path) -> None:
    def bad(msg: str) -> UserError:
        return UserError(f"sample {key}: {msg} (kind {kind}, see formats.md)", file=tar)

    if kind == "caption":
        if not any(is_image_ext(k) for k in sample if not k.startswith("__")):
            raise bad("a caption sample needs an image member (<key>.jpg, .png, ...)")
        return
    if kind == "interleaved":
        texts, images = rec.get("texts"), rec.get("images")
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
            raise bad("json needs 'texts' and 'images' lists of equal length")
        names = [n for n in images if n]
    elif kind == "sft":
        conv = rec.get("conversations")
        if not isinstance(conv, list) or not all(isinstance(t, dict) and "role" in t and "content" in t for t in conv):
            raise bad("json needs 'conversations': [{role, content}, ...]")
        names = rec.get("images") or []
    else:
        if not all(isinstance(rec.get(k), str) for k in ("prompt", "chosen", "rejected")):
            raise bad("json needs string 'prompt', 'chosen' and 'rejected'")
        names = rec.get("images") or []
    missing = [n for n in names if n not in sample]
    if missing:
        raise bad(f"image member(s) {', '.join(missing)} listed in json but absent from the tar")


def _row(key: str, rec: dict, sample: dict, txt: str | None, kind: str) -> dict[str, Any]:
    """A `samples` row derived from the members of a sample (for tars without our sidecars)."""
    meta = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
    entries = meta.get("entries") or []
    objects = rec.get("objects") or meta.get("objects") or []
    scores = [e.get("confidence") for e in entries if isinstance(e, dict)] + [
        o.get("score") for o in objects if isinstance(o, dict)]
    scores = [s for s in scores if isinstance(s, (int, float))]
    if kind == "caption":
        length = len(txt) if txt is not None else None
    elif kind == "interleaved":
        length = sum(len(t) for t in rec.get("texts", []) if t)
    elif kind == "sft":
        length = sum(len(t.get("content", "")) for t in rec.get("conversations", []))
    else:
        length = sum(len(rec.get(k, "")) for k in ("prompt", "chosen", "rejected"))
    return {
        "key": key, "uid": rec.get("uid"), "url": rec.get("url"), "caption": txt, "status": "success",
        "error_message": None, "width": rec.get("width"), "height": rec.get("height"),
        "original_width": rec.get("original_width"), "original_height": rec.get("original_height"),
        "sha256": rec.get("sha256"),
        "image_bytes": sum(len(v) for k, v in sample.items() if is_image_ext(k)),
        "caption_length": length,
        "n_captions": len(rec["captions"]) if isinstance(rec.get("captions"), list) else None,
        "n_ocr": len(entries), "n_objects": len(objects),
        "mean_confidence": sum(scores) / len(scores) if scores else None,
        "has_source_caption": bool(rec.get("source_caption") or rec.get("caption")),
    }


def scan_shard(tar: str | Path, kind: str, counter: TokenCounter, *, rows: bool = False,
               checksum: bool = False) -> ShardScan:
    """Read one tar: samples, tokens (and `samples` rows when `rows`, its sha256 when `checksum`:
    hashing reads the whole tar again, so only callers that use the value ask for it)."""
    tar = Path(tar)
    n = tokens = 0
    out_rows = []
    try:
        for sample in iter_shard(tar):
            key = sample["__key__"]
            try:
                rec = json.loads(sample["json"]) if "json" in sample else {}
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UserError(f"sample {key}: {key}.json is not valid JSON", file=tar) from None
            _check_record(kind, key, rec, sample, tar)
            txt = sample["txt"].decode("utf-8", errors="replace") if "txt" in sample else None
            n_images = sum(1 for k in sample if is_image_ext(k))
            tokens += counter.sample(kind, rec, txt, n_images)
            n += 1
            if rows:
                out_rows.append(_row(key, rec, sample, txt, kind))
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
        scans.append((path, info, pa.Table.from_pylist(scan.rows, schema=SIDECAR_SCHEMA), scan.tokens))
    with transaction(con):
        for path, info, rows, tokens in scans:
            cat._insert_shard(path, name, info, rows=rows, n_tokens=tokens)
    return len(scans)
