"""Rebuild grounding captions of existing shards from their stored objects, without re-detecting.

Each sample's `<key>.json` keeps `metadata.objects` and `source_caption`, so a new caption format,
default style or lead-in is a pure re-templating pass: every shard of INPUT is rewritten to OUTPUT
under the same name, images and other members byte-for-byte, failed rows of the sidecar kept,
`.txt` / `captions` / `generator` / sidecar caption columns updated. Shards are published through
`core.shards.ShardWriter` (atomic), and a shard already retemplated with the same options is
skipped, so an interrupted run can simply be started again. OUTPUT is then registered in the
catalog like the engines' outputs (`register=False` skips it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from blip3.core.errors import UserError
from blip3.core.shards import SampleRow, Shard, ShardWriter, iter_shard
from blip3.core.storage import Location, output_location
from blip3.datagen.caption_text import EmptyLabel
from blip3.datagen.grounding_captions import (
    DEFAULT_ALSO_LEAD_IN,
    DEFAULT_LEAD_IN,
    GroundedObject,
    build_captions,
    check_caption_choice,
    pick_caption,
)


@dataclass(frozen=True)
class TemplateOptions:
    caption_format: str = "positional"
    caption_style: str | None = None
    lead_in: str = DEFAULT_LEAD_IN
    also_lead_in: str = DEFAULT_ALSO_LEAD_IN
    tag_order: str = "detector"

    def validate(self) -> "TemplateOptions":
        check_caption_choice(self.caption_format, self.caption_style, self.tag_order)
        return self

    def as_generator(self) -> dict[str, Any]:
        return {"caption_format": self.caption_format, "caption_style": self.caption_style,
                "lead_in": self.lead_in, "also_lead_in": self.also_lead_in, "tag_order": self.tag_order}


@dataclass
class RetemplateResult:
    shards_written: int = 0
    shards_skipped: int = 0
    samples: int = 0
    source: str | None = None  # the catalog source OUTPUT was registered as


def retemplate_record(record: dict[str, Any], opts: TemplateOptions) -> tuple[str, dict[str, Any]]:
    """(new `.txt`, new record) for one sample's json."""
    objects = [GroundedObject.from_dict(o) for o in (record.get("metadata") or {}).get("objects", [])]
    source = record.get("source_caption")
    captions = build_captions(objects, source, lead_in=opts.lead_in, also_lead_in=opts.also_lead_in,
                              tag_order=opts.tag_order)
    chosen = pick_caption(captions, opts.caption_format, opts.caption_style)
    new = dict(record)
    new["captions"] = captions
    new["generator"] = {**(record.get("generator") or {}), **opts.as_generator()}
    return chosen["text"], new


def retemplate(input_dir: str | Path, output_dir: str | Path, opts: TemplateOptions = TemplateOptions(),
               *, overwrite: bool = False, register: bool = True, db: str | Path | None = None,
               source: str | None = None) -> RetemplateResult:
    """Rewrite every finished shard of `input_dir` into `output_dir` with new captions, then
    register `output_dir` in the catalog as source `source` (default: its folder name)."""
    src, dst = Location(input_dir), output_location(output_dir, field="--out")
    opts.validate()
    if not src.exists():
        raise UserError("not a folder of shards", file=src.url)
    if src.url == dst.url:
        raise UserError("OUTPUT must differ from INPUT (the input shards are read while writing)", file=dst.url)
    shards = src.finished()
    if not shards:
        raise UserError("no finished shards (NNNNNN_stats.json) found", file=src.url)
    for info in shards:
        if info.generator.get("name") != "grounding":
            raise UserError(f"shard made by {info.generator.get('name')!r}, not the grounding engine",
                            field="generator.name", file=info.stats)
    result = RetemplateResult()
    with dst.lock("retemplate"):  # one writer per folder (core.storage.WriterLock)
        for info in shards:
            name = info.tar.rsplit("/", 1)[-1][: -len(".tar")]  # the input's shard-name width is kept
            stats = src.stats(name) or {}
            generator = {**info.generator, **opts.as_generator()}
            done = dst.stats(name)
            if (not overwrite and done is not None and done.get("generator") == generator
                    and done.get("retemplated_from") == info.sha256 and dst.is_complete(name, stats=done)):
                result.shards_skipped += 1
                continue
            result.samples += _rewrite_shard(src, info, dst, opts, generator, stats.get("input_digest"), len(name))
            result.shards_written += 1
    if register:
        from blip3.core.catalog import Catalog

        with Catalog(db) as cat:
            result.source = cat.add_output(dst, source=source, kind="caption").source
    return result


def _rewrite_shard(src: Location, info: Shard, dst: Location, opts: TemplateOptions, generator: dict[str, Any],
                   input_digest: str | None, digits: int) -> int:
    name = info.tar.rsplit("/", 1)[-1]
    with src.open(name[: -len(".tar")] + ".parquet") as f:
        rows = pq.read_table(f).to_pylist()
    with src.open(name) as tar, ShardWriter(dst, info.index, generator=generator, digits=digits) as w:
        samples = iter_shard(info.tar, fileobj=tar)
        for r in rows:
            row = SampleRow(**r)
            if row.status != "success":
                w.add_failure(row)
                continue
            sample = next(samples, None)
            if sample is None or sample["__key__"] != row.key:
                raise UserError(f"tar and sidecar disagree at key {row.key!r}", file=info.tar)
            try:
                txt, record = retemplate_record(json.loads(sample["json"]), opts)
            except EmptyLabel as e:  # an object stored before labels were checked: a row with its reason
                row.status, row.error_message = "failed", f"caption: {e}"
                w.add_failure(row)
                continue
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            members["txt"], members["json"] = txt, record
            row.caption, row.caption_length, row.n_captions = txt, len(txt), len(record["captions"])
            w.add(row.key, members, row)
        w.close(extra_stats={"input_digest": input_digest, "retemplated_from": info.sha256})
    return len(rows)
