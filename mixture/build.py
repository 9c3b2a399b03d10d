"""`blip3 mix build`: resolve a mixture spec (what a user writes) into a manifest (what the
trainer reads), and record it in the catalog.

Spec (docs/formats.md): `name`, `seed` (default 0), optional `target` (`{samples: N}` or
`{tokens: N}`), optional `weight_by` (`samples` | `tokens`, default samples) and `sources`, each
`{name, weight}` for a source registered with `blip3 source add`, or `{name, path, kind, weight}`
for one given inline (works without a catalog). Paths may use `${VAR}` / `${VAR:-default}` and
are relative to the spec's folder. A caption source may add `caption: {...}` to train on one of
its stored caption variants instead of `.txt` (mixture/caption_choice.py). `curation: {exclude,
keep_all}` leaves out samples `blip3 curate` dropped (mixture/curation.py; decontamination by
default).

The plan, and why:
- Weights are relative (normalised to sum 1), each must be > 0.
- The loader interleaves by samples. With `weight_by: tokens` a source's sampling weight is its
  token weight divided by its mean tokens per sample (normalised), so its share of *tokens*
  matches the spec.
- Default target: one pass over the source with the largest weight (docs/formats.md).
  A token target is turned into samples through the mean tokens per sample of the mix.
- Planned samples per source are the weights times the target, apportioned by largest remainder
  so they sum to the target exactly; epochs = planned / available, realised tokens = planned x
  mean tokens per sample.
- Every catalogued shard is checked against its record before the manifest is written (its size;
  its sha256 too with `--verify sha256`; inline shards are hashed): a shard that moved or changed
  is one clear error naming the field and the file. Catalogued shards may be on an object store.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import astuple
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from blip3.core.catalog import SOURCE_KINDS
from blip3.core.errors import UserError
from blip3.core.logs import get_logger
from blip3.core.yamlio import read_yaml
from blip3.mixture.caption_choice import validate_caption_choice
from blip3.mixture.curation import check_rules_applied, source_exclusions, validate_curation
from blip3.mixture.manifest import (WEIGHT_BY, Manifest, ManifestSource, ShardRef, check_distinct_shards,
                                    check_verify_mode, shard_change, write_manifest)
from blip3.mixture.tokens import DEFAULT_VISION_TOKENS_PER_CROP, TokenCounter

log = get_logger("mix")
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_path(text: str, *, field: str, file: str | None, variables: Mapping[str, str] | None = None) -> str:
    """`${VAR}` and `${VAR:-default}` from `variables` (what the trainer's prepare step made), else
    the environment; an unset VAR without default is an error."""

    def sub(m: re.Match) -> str:
        val = (variables or {}).get(m.group(1)) or os.environ.get(m.group(1))
        if val:
            return val
        if m.group(2) is not None:
            return m.group(2)
        raise UserError(f"environment variable {m.group(1)} is not set", field=field, file=file)

    return _VAR.sub(sub, text)


def load_spec(spec: dict | str | Path) -> tuple[dict[str, Any], str | None, Path]:
    """(parsed spec, its file or None, folder relative paths resolve against)."""
    if isinstance(spec, dict):
        return spec, None, Path.cwd()
    path = Path(spec)
    data = read_yaml(path, "spec")
    return data, str(path), path.resolve().parent


def validate_spec(data: Any, file: str | None = None) -> dict[str, Any]:
    """Check a spec's shape (no I/O); returns it with defaults filled in."""
    def err(msg: str, field: str) -> UserError:
        return UserError(msg, field=field, file=file)

    if not isinstance(data, dict):
        raise err("a mixture spec is a mapping with name, seed and sources", "spec")
    if "manifest_version" in data:
        raise err("this is a built manifest, not a spec; pass it to the loader or `mix sample`", "manifest_version")
    unknown = set(data) - {"name", "seed", "target", "weight_by", "vision_tokens_per_crop", "sources", "description",
                           "curation"}
    if unknown:
        raise err(f"unknown field(s) {', '.join(sorted(unknown))}", sorted(unknown)[0])
    name = data.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
        raise err(f"must be a name of letters, digits, '.', '_' or '-', got {name!r}", "name")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise err(f"must be an integer >= 0, got {seed!r}", "seed")
    weight_by = data.get("weight_by", "samples")
    if weight_by not in WEIGHT_BY:
        raise err(f"must be one of {', '.join(WEIGHT_BY)}, got {weight_by!r}", "weight_by")
    vision = data.get("vision_tokens_per_crop")
    if vision is not None and (isinstance(vision, bool) or not isinstance(vision, int) or vision < 1):
        raise err(f"must be an integer >= 1 (the model's vision tokens per image crop), got {vision!r}",
                  "vision_tokens_per_crop")
    target = _validate_target(data.get("target"), err)
    sources = data.get("sources")
    if not isinstance(sources, list) or not sources:
        raise err("must be a non-empty list of {name, weight}", "sources")
    out_sources = [_validate_source(s, f"sources[{i}]", err, file) for i, s in enumerate(sources)]
    for i, s in enumerate(out_sources):
        if any(o["name"] == s["name"] for o in out_sources[:i]):
            raise err(f"duplicate source {s['name']!r}", f"sources[{i}].name")
    return {"name": name, "seed": seed, "weight_by": weight_by, "target": target,
            "vision_tokens_per_crop": vision, "sources": out_sources,
            "curation": validate_curation(data.get("curation"), file)}


def _validate_target(target: Any, err) -> dict[str, int] | None:
    if target is None:
        return None
    if not isinstance(target, dict) or len(target) != 1 or next(iter(target)) not in ("samples", "tokens"):
        raise err("must be {samples: N} or {tokens: N}", "target")
    (unit, n), = target.items()
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise err(f"must be an integer >= 1, got {n!r}", f"target.{unit}")
    return {unit: n}


def _validate_source(s: Any, f: str, err, file: str | None) -> dict[str, Any]:
    """One `sources[i]` entry: `{name, weight}` (catalogued) or `{name, path, kind, weight}`."""
    if not isinstance(s, dict):
        raise err("must be a mapping {name, weight} or {name, path, kind, weight}", f)
    extra = set(s) - {"name", "weight", "path", "kind", "caption"}
    if extra:
        raise err(f"unknown field(s) {', '.join(sorted(extra))}", f"{f}.{sorted(extra)[0]}")
    sname = s.get("name")
    if not isinstance(sname, str) or not sname:
        raise err(f"must be a non-empty string, got {sname!r}", f"{f}.name")
    w = s.get("weight")
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
        raise err(f"must be a number > 0, got {w!r}", f"{f}.weight")
    if "path" in s:
        if not isinstance(s["path"], str) or not s["path"]:
            raise err("must be a path, glob or brace pattern of .tar shards", f"{f}.path")
        if s.get("kind") not in SOURCE_KINDS:
            raise err(f"an inline source needs kind, one of {', '.join(SOURCE_KINDS)}; got {s.get('kind')!r}",
                      f"{f}.kind")
    elif "kind" in s:
        raise err("kind is only given with path (a catalogued source has its kind)", f"{f}.kind")
    if "caption" in s:
        s = dict(s, caption=validate_caption_choice(s["caption"], field=f"{f}.caption", file=file))
    return dict(s, weight=float(w))


def build_manifest(
    spec: dict | str | Path,
    *,
    db: str | Path | None = None,
    out: str | Path | None = None,
    tokenizer: str | Path | None = None,
    crops_per_image: int = 1,
    vision_tokens_per_crop: int | None = None,
    record: bool = True,
    verify: str = "size",
    variables: Mapping[str, str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Resolve `spec` into a manifest; write it to `out`; record it in the catalog.

    Vision tokens per crop: the spec's `vision_tokens_per_crop`, else `vision_tokens_per_crop`
    (the model of the stage that builds it), else the released model's; a spec that declares
    another value than the caller's model is an error, not a silent choice.

    The catalog (`db`, else $BLIP3_DB / ./catalog.duckdb) is opened when `db` is given or a
    source is named without a path; the mixture is recorded there unless `record=False`.
    `verify`: "size" (default) checks each catalogued shard's existence and size and trusts the
    sha256 its writer recorded (hash once); "sha256" re-reads every shard to re-hash it. Catalogued
    shards may be on an object store (`s3://...`, from `catalog add s3://...`): `storage_options`
    are its fsspec filesystem arguments (else the usual environment variables).
    """
    check_verify_mode(verify, ("sha256", "size"))  # a manifest is only written for shards looked at
    data, file, base = load_spec(spec)
    spec_d = validate_spec(data, file)
    vision = _vision_tokens_per_crop(spec_d["vision_tokens_per_crop"], vision_tokens_per_crop, file)
    counter = TokenCounter(tokenizer, vision_tokens_per_crop=vision, crops_per_image=crops_per_image)
    cat = _open_catalog(db, spec_d["sources"], file)
    try:
        resolved = []
        for i, s in enumerate(spec_d["sources"]):
            if "path" in s:
                resolved.append(_inline_source(s, i, counter, base, file, variables))
            else:
                resolved.append(_catalog_source(cat, s, i, counter, file, checksum=verify == "sha256",
                                                storage_options=storage_options, curation=spec_d["curation"]))
        check_distinct_shards(resolved, file=file, spec=True)  # two sources naming one tar (same caption variant)
        catalogued = {s["name"]: r.curation for s, r in zip(spec_d["sources"], resolved) if "path" not in s}
        for warning in check_rules_applied(spec_d["curation"], catalogued, file):
            log.warning(warning)
        manifest = _plan(spec_d, resolved, counter)
        if out is not None:
            write_manifest(manifest, out)
            manifest.path = str(out)
        if cat is not None and record:
            cat.record_mixture(manifest, spec_d)
    finally:
        if cat is not None:
            cat.close()
    return manifest


def _open_catalog(db: str | Path | None, sources: list[dict], file: str | None):
    """The catalog when `db` is given or a source is named without a path, else None (an inline
    spec builds without one)."""
    from blip3.core.catalog import Catalog, resolve_db

    if db is None and all("path" in s for s in sources):
        return None
    if db is None and not resolve_db(None).exists():
        missing = next(i for i, s in enumerate(sources) if "path" not in s)
        raise UserError(
            f"source {sources[missing]['name']!r} has no path and there is no catalog "
            f"({resolve_db(None)}); register it with `blip3 source add` or give path and kind",
            field=f"sources[{missing}].name", file=file,
        )
    return Catalog(db)


def _vision_tokens_per_crop(declared: int | None, model: int | None, file: str | None) -> int:
    if declared is not None and model is not None and declared != model:
        raise UserError(f"the spec declares {declared} vision tokens per crop, the model has {model}",
                        field="vision_tokens_per_crop", file=file)
    return declared or model or DEFAULT_VISION_TOKENS_PER_CROP


def _inline_source(s: dict, i: int, counter: TokenCounter, base: Path, file: str | None,
                   variables: Mapping[str, str] | None = None) -> ManifestSource:
    from blip3.core.shards import resolve_shards
    from blip3.mixture.sources import scan_shard

    field = f"sources[{i}].path"
    try:
        tars = resolve_shards(expand_path(s["path"], field=field, file=file, variables=variables), base)
    except UserError as e:
        raise UserError(f"source {s['name']!r}: {e}", field=field, file=file) from None
    shards = []
    for tar in tars:
        scan = scan_shard(tar, s["kind"], counter, checksum=True)
        if scan.samples:
            shards.append(ShardRef(scan.path, scan.sha256, scan.bytes, scan.samples, scan.tokens))
    return _source(s, s["kind"], shards, i, file)


def _catalog_source(cat, s: dict, i: int, counter: TokenCounter, file: str | None, *,
                    checksum: bool, storage_options: dict[str, Any] | None = None,
                    curation: dict[str, Any] | None = None) -> ManifestSource:
    field = f"sources[{i}].name"
    row = cat.source(s["name"])
    if row is None:
        raise UserError(
            f"unknown source {s['name']!r} (catalog {cat.path} has: {', '.join(cat.source_names()) or 'none'}); "
            f"register it with `blip3 source add` or give path and kind",
            field=field, file=file,
        )
    kind, meta = row.kind, row.meta
    if meta.get("tokenizer") not in (None, counter.label):
        raise UserError(
            f"source {s['name']!r} was counted with tokenizer {meta['tokenizer']}, this build uses {counter.label}; "
            f"re-add it with the same --tokenizer",
            field=field, file=file,
        )
    if "tokenizer" in meta and meta.get("vision_tokens_per_image") != counter.vision_tokens_per_image:
        raise UserError(
            f"source {s['name']!r} was counted with {meta.get('vision_tokens_per_image')} vision tokens per image, "
            f"this build uses {counter.vision_tokens_per_image}; re-add it with the same --crops-per-image and "
            f"--vision-tokens-per-crop",
            field=field, file=file,
        )
    from blip3.core.logs import progress

    rules = (curation or {}).get("rules", [])
    left_out = source_exclusions(cat.con, s["name"], rules)
    shards = []
    listed = [astuple(r) for r in cat.source_shards(s["name"])]
    with progress(transient=True) as bar:
        task = bar.add_task(f"mix build: check {s['name']}", total=len(listed))
        for path, sha, size, n, tokens, status in listed:
            if status != "ok":
                raise UserError(f"source {s['name']!r}: shard {path} changed since it was catalogued (status {status})",
                                field=field, file=file)
            change = shard_change(path, size, sha, checksum=checksum, storage_options=storage_options)
            if change == "missing":
                raise UserError(f"source {s['name']!r}: shard {path} is missing (moved or deleted)", field=field, file=file)
            if change is not None:
                raise UserError(f"source {s['name']!r}: shard {path} changed on disk ({change} differs from the catalog)",
                                field=field, file=file)
            if tokens is None:
                from blip3.mixture.sources import scan_shard

                tokens = scan_shard(path, kind, counter, storage_options=storage_options).tokens
            excluded = sorted(left_out.keys.get(path, ()))
            kept = int(n or 0) - len(excluded)
            if kept > 0:
                # Tokens of the kept samples, estimated as the shard's mean per sample (the tar is
                # not re-read to count them).
                shards.append(ShardRef(path, sha, int(size), kept, round(int(tokens) * kept / int(n)),
                                       exclude=excluded or None))
            bar.advance(task)
    source = _source(s, kind, shards, i, file)
    source.curation = left_out.removed or None
    return source


def _source(s: dict, kind: str, shards: list[ShardRef], i: int, file: str | None) -> ManifestSource:
    samples = sum(sh.samples for sh in shards)
    if not samples:
        raise UserError(f"source {s['name']!r} has no samples", field=f"sources[{i}]", file=file)
    if s.get("caption") and kind != "caption":
        raise UserError(f"source {s['name']!r} is {kind}: only caption sources choose a caption variant",
                        field=f"sources[{i}].caption", file=file)
    return ManifestSource(name=s["name"], kind=kind, weight=s["weight"], shards=shards, samples=samples,
                          tokens=sum(sh.tokens or 0 for sh in shards), epochs=0.0, caption=s.get("caption"))


def apportion(total: int, weights: list[float]) -> list[int]:
    """Integers proportional to `weights` summing to `total` (largest remainder)."""
    raw = [w * total for w in weights]
    out = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (out[i] - raw[i], i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def _plan(spec: dict, sources: list[ManifestSource], counter: TokenCounter) -> Manifest:
    wsum = sum(s.weight for s in sources)
    for s in sources:
        s.weight = round(s.weight / wsum, 12)
    mean_tok = [s.tokens / s.samples for s in sources]
    if spec["weight_by"] == "tokens":
        if any(m <= 0 for m in mean_tok):
            raise UserError("weight_by: tokens needs sources with tokens", field="weight_by")
        raw = [s.weight / m for s, m in zip(sources, mean_tok)]
    else:
        raw = [s.weight for s in sources]
    for s, r in zip(sources, raw):
        s.sample_weight = round(r / sum(raw), 12)
    tokens_per_sample = sum(s.sample_weight * m for s, m in zip(sources, mean_tok))
    target = spec["target"]
    if target and "samples" in target:
        total = target["samples"]
    elif target:
        total = max(1, round(target["tokens"] / max(tokens_per_sample, 1e-9)))
    else:  # one pass over the source with the largest weight
        j = max(range(len(sources)), key=lambda k: (sources[k].weight, -k))
        total = max(1, round(sources[j].samples / sources[j].sample_weight))
    planned = apportion(total, [s.sample_weight for s in sources])
    for s, n, m in zip(sources, planned, mean_tok):
        s.target_samples = n
        s.target_tokens = round(n * m)
        s.epochs = round(n / s.samples, 6)
    curated = [s for s in sources if s.curation is not None]
    curation = spec.get("curation") or {}
    return Manifest(
        name=spec["name"],
        seed=spec["seed"],
        target={"samples": total, "tokens": sum(s.target_tokens for s in sources)},
        weight_by=spec["weight_by"],
        sources=sources,
        tokenizer=counter.label,
        vision_tokens_per_image=counter.vision_tokens_per_image,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        curation={k: curation[k] for k in ("rules", "exclude", "keep_all")} if curated else None,
    )
