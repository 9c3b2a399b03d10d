"""The mixture manifest: the one file the trainer reads to know exactly which samples it will see.

A manifest is what `blip3 mix build` resolves a spec into (docs/formats.md, "Manifest"): every
source with its kind, its normalised target weight, the sampling weight the loader interleaves by,
its resolved shard list (path, sha256, bytes, samples), the counts it has (`samples`, `tokens`)
and the counts the mixture plans to draw from it (`target_samples`, `target_tokens`, `epochs`).
Everything needed to reproduce a run's data order is in it.

YAML on disk (JSON is accepted too, it is YAML). A top-level `manifest_version` tells a built
manifest from a spec, so passing a spec where a manifest is expected is one clear error.
Relative shard paths are resolved against the manifest's folder; `build` writes absolute ones.

Validation raises `core.errors.UserError` naming the field (`sources[2].shards[0].sha256`) and
the file, before any sample is read.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from blip3.core.catalog import SOURCE_KINDS
from blip3.core.errors import UserError
from blip3.core.shard_folder import is_remote, location_sha256, location_size
from blip3.core.yamlio import read_yaml
from blip3.mixture.caption_choice import validate_caption_choice
from blip3.mixture.tokens import DEFAULT_VISION_TOKENS_PER_CROP, ESTIMATE_LABEL

MANIFEST_VERSION = 1
WEIGHT_BY = ("samples", "tokens")
#: How much of each shard is checked against the manifest before a sample is read:
#: "sha256" (re-hash: catches any change, reads all bytes), "size" (exists with its recorded
#: size: cheap) or "none" (the fields only).
VERIFY_MODES = ("sha256", "size", "none")


@dataclass
class ShardRef:
    """One tar of a source, pinned by checksum."""

    path: str
    sha256: str
    bytes: int
    samples: int  # samples the mixture draws from it: those in the tar less `exclude`
    tokens: int | None = None
    exclude: list[str] | None = None  # keys a curation rule left out (mixture/curation.py)


@dataclass
class ManifestSource:
    """One source of the mixture and its plan.

    `weight` is the normalised target share (of samples or of tokens, per the manifest's
    `weight_by`); `sample_weight` is the share of *samples* the loader draws from this source
    (equal to `weight` when weighting by samples). `samples`/`tokens` are what the source has;
    `target_samples`/`target_tokens` what the mixture draws; `epochs` = target / available.
    """

    name: str
    kind: str
    weight: float
    shards: list[ShardRef]
    samples: int
    tokens: int
    epochs: float
    sample_weight: float | None = None
    target_samples: int | None = None
    target_tokens: int | None = None
    caption: dict[str, Any] | None = None  # the caption variant the loader hands out (mixture.caption_choice)
    curation: dict[str, int] | None = None  # rule -> samples of this source it left out (mixture.curation)

    def __post_init__(self) -> None:
        if self.sample_weight is None:
            self.sample_weight = self.weight


@dataclass
class Manifest:
    """A resolved mixture. `target` is `{"samples": N}` and/or `{"tokens": N}`."""

    name: str
    seed: int
    target: dict[str, int]
    weight_by: str
    sources: list[ManifestSource]
    tokenizer: str = ESTIMATE_LABEL
    vision_tokens_per_image: int = DEFAULT_VISION_TOKENS_PER_CROP
    created_at: str | None = None
    curation: dict[str, Any] | None = None  # the rules applied: {rules, exclude, keep_all}
    path: str | None = field(default=None, compare=False)  # where it was loaded from (not written)

    def source(self, name: str) -> ManifestSource:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        if d.get("curation") is None:
            d.pop("curation", None)  # only a mixture that applied curation rules says so
        for s in d["sources"]:
            for optional in ("caption", "curation"):  # only sources that use them say so
                if s.get(optional) is None:
                    s.pop(optional, None)
            for sh in s["shards"]:
                if not sh.get("exclude"):
                    sh.pop("exclude", None)
        return {"manifest_version": MANIFEST_VERSION, **d}


def write_manifest(manifest: Manifest, path: str | Path) -> Path:
    """Write `manifest` as YAML (atomically: a reader never sees half a manifest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(manifest.to_dict(), sort_keys=False, width=120)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def load_manifest(path: str | Path, *, verify: str = "size") -> Manifest:
    """Read and validate a manifest.

    `verify`: "none" (fields only), "size" (every shard exists with its recorded byte size; the
    default, cheap) or "sha256" (also re-hash every shard: catches any change, reads all bytes).
    """
    check_verify_mode(verify)
    path = Path(path)
    manifest = manifest_from_dict(read_yaml(path, "manifest"), file=path)
    manifest.path = str(path)
    verify_shards(manifest, verify, file=path)
    return manifest


def check_verify_mode(verify: str, modes: tuple[str, ...] = VERIFY_MODES) -> str:
    """`verify` if it is one of `modes` (every caller's check of the option), else a UserError."""
    if verify not in modes:
        raise UserError(f"must be {', '.join(modes[:-1])} or {modes[-1]}, got {verify!r}", field="verify")
    return verify


def shard_change(path: Path | str, size: int, sha256: str, *, checksum: bool,
                 storage_options: dict[str, Any] | None = None) -> str | None:
    """What differs between a shard (a local path or an object-store URL) and its record:
    "missing", "bytes", "sha256" (only looked at with `checksum`), or None when it is as recorded."""
    actual = location_size(path, storage_options)
    if actual is None:
        return "missing"
    if actual != size:
        return "bytes"
    if checksum and location_sha256(path, storage_options) != sha256:
        return "sha256"
    return None


def manifest_from_dict(data: Any, *, file: str | Path | None = None) -> Manifest:
    """Validate a parsed manifest; relative shard paths resolve against `file`'s folder."""
    v = _Validator(file)
    if not isinstance(data, dict):
        raise UserError("a manifest is a mapping with name, seed, target, weight_by, sources", file=file)
    if "manifest_version" not in data:
        raise UserError(
            "no manifest_version: this looks like a mixture spec; resolve it with `blip3 mix build SPEC -o MANIFEST`",
            field="manifest_version",
            file=file,
        )
    if data["manifest_version"] != MANIFEST_VERSION:
        raise UserError(f"unsupported version {data['manifest_version']!r}", field="manifest_version", file=file)
    name = v.string(data, "name")
    seed = v.integer(data, "seed", minimum=0)
    weight_by = v.choice(data, "weight_by", WEIGHT_BY)
    target = data.get("target")
    if not isinstance(target, dict) or not target or set(target) - {"samples", "tokens"}:
        raise UserError("must be a mapping with samples and/or tokens", field="target", file=file)
    target = {k: v.integer(target, k, minimum=1, prefix="target.") for k in target}
    raw_sources = data.get("sources")
    if not isinstance(raw_sources, list) or not raw_sources:
        raise UserError("must be a non-empty list", field="sources", file=file)
    base = Path(file).resolve().parent if file is not None else Path.cwd()
    sources = [_source(v, s, f"sources[{i}].", base) for i, s in enumerate(raw_sources)]
    names = [s.name for s in sources]
    for i, n in enumerate(names):
        if names.index(n) != i:
            raise UserError(f"duplicate source name {n!r}", field=f"sources[{i}].name", file=file)
    check_distinct_shards(sources, file=file)
    return Manifest(
        name=name,
        seed=seed,
        target=target,
        weight_by=weight_by,
        sources=sources,
        tokenizer=str(data.get("tokenizer", ESTIMATE_LABEL)),
        vision_tokens_per_image=v.integer(data, "vision_tokens_per_image", minimum=0,
                                          default=DEFAULT_VISION_TOKENS_PER_CROP),
        created_at=data.get("created_at"),
        curation=_curation(data.get("curation"), "curation", file),
    )


def _curation(value: Any, field_name: str, file: str | Path | None) -> dict[str, Any] | None:
    """A manifest's record of the curation applied (a mapping), as written by `mix build`."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise UserError("must be a mapping", field=field_name, file=file)
    return value


def _exclude(value: Any, field_name: str, file: str | None) -> list[str] | None:
    """A shard's `exclude`: distinct keys (strings)."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(k, str) and k for k in value):
        raise UserError("must be a list of sample keys", field=field_name, file=file)
    if len(set(value)) != len(value):
        raise UserError("lists a key twice", field=field_name, file=file)
    return value


def _source(v: "_Validator", s: Any, prefix: str, base: Path) -> ManifestSource:
    if not isinstance(s, dict):
        raise UserError("must be a mapping", field=prefix.rstrip("."), file=v.file)
    shards_raw = s.get("shards")
    if not isinstance(shards_raw, list) or not shards_raw:
        raise UserError("a source needs a non-empty shard list", field=f"{prefix}shards", file=v.file)
    shards = []
    for j, sh in enumerate(shards_raw):
        p = f"{prefix}shards[{j}]."
        if not isinstance(sh, dict):
            raise UserError("must be a mapping with path, sha256, bytes, samples", field=p.rstrip("."), file=v.file)
        shard_path = v.string(sh, "path", prefix=p)
        if not is_remote(shard_path) and not Path(shard_path).is_absolute():  # a URL stays as written
            shard_path = str(base / shard_path)
        sha = v.string(sh, "sha256", prefix=p)
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise UserError(f"not a sha256 hex digest: {sha!r}", field=f"{p}sha256", file=v.file)
        shards.append(
            ShardRef(
                path=str(shard_path),
                sha256=sha,
                bytes=v.integer(sh, "bytes", minimum=1, prefix=p),
                samples=v.integer(sh, "samples", minimum=0, prefix=p),
                tokens=v.integer(sh, "tokens", minimum=0, prefix=p, default=None),
                exclude=_exclude(sh.get("exclude"), f"{p}exclude", v.file),
            )
        )
    samples = v.integer(s, "samples", minimum=1, prefix=prefix)
    if samples != sum(sh.samples for sh in shards):
        raise UserError(
            f"{samples} does not match the sum of its shards' samples ({sum(sh.samples for sh in shards)})",
            field=f"{prefix}samples",
            file=v.file,
        )
    return ManifestSource(
        name=v.string(s, "name", prefix=prefix),
        kind=v.choice(s, "kind", SOURCE_KINDS, prefix=prefix),
        weight=v.positive(s, "weight", prefix=prefix),
        sample_weight=v.positive(s, "sample_weight", prefix=prefix, default=None),
        shards=shards,
        samples=samples,
        tokens=v.integer(s, "tokens", minimum=0, prefix=prefix),
        epochs=v.number(s, "epochs", prefix=prefix),
        target_samples=v.integer(s, "target_samples", minimum=0, prefix=prefix, default=None),
        target_tokens=v.integer(s, "target_tokens", minimum=0, prefix=prefix, default=None),
        caption=None if s.get("caption") is None else validate_caption_choice(
            s["caption"], field=f"{prefix}caption", file=v.file),
        curation=_curation(s.get("curation"), f"{prefix}curation", v.file),
    )


def check_distinct_shards(sources: list[ManifestSource], *, file: str | Path | None = None,
                          spec: bool = False) -> None:
    """Each shard is listed once: a shard listed twice would be served twice per epoch, silently
    doubling its weight (a source's `weight` is how a mixture draws more of it). The same shard may
    appear in two sources only when they hand out different caption variants (different text).
    `spec`: the sources come from a mixture spec, whose fields are `sources[i]` (no shard list)."""
    seen: dict[tuple[str, str], tuple[int, int]] = {}
    for i, src in enumerate(sources):
        variant = repr(sorted((src.caption or {}).items()))
        for j, sh in enumerate(src.shards):
            fi, fj = seen.setdefault((sh.path, variant), (i, j))
            if (fi, fj) == (i, j):
                continue
            where = (f"source {src.name!r}" if fi == i else
                     f"sources {sources[fi].name!r} and {src.name!r} (with the same caption variant)")
            field = f"sources[{i}]" if spec else f"sources[{i}].shards[{j}].path"
            also = "" if spec else f" (also sources[{fi}].shards[{fj}])"
            raise UserError(f"shard {sh.path} is listed twice in {where}{also}: it would be served twice per epoch; "
                            "list it once and set the source's weight instead", field=field, file=file)


def verify_shards(manifest: Manifest, verify: str, *, file: str | Path | None = None) -> None:
    """Every shard is where the manifest says, as `verify` (one of VERIFY_MODES) checks it."""
    if check_verify_mode(verify) == "none":
        return
    for i, src in enumerate(manifest.sources):
        for j, sh in enumerate(src.shards):
            change = shard_change(sh.path, sh.bytes, sh.sha256, checksum=verify == "sha256")
            if change is None:
                continue
            what = {"missing": "is missing (moved or deleted)",
                    "bytes": f"changed: {location_size(sh.path) or 0} bytes on disk, {sh.bytes} recorded",
                    "sha256": "changed: sha256 differs from the recorded one"}[change]
            raise UserError(f"shard {sh.path} of source {src.name!r} {what}",
                            field=f"sources[{i}].shards[{j}].{'path' if change == 'missing' else change}", file=file)


_MISSING = object()


class _Validator:
    """Typed field access that raises one UserError naming the field and the file."""

    def __init__(self, file: str | Path | None):
        self.file = None if file is None else str(file)

    def _get(self, d: dict, key: str, prefix: str, default: Any) -> Any:
        if key in d and d[key] is not None:
            return d[key]
        if default is not _MISSING:
            return default
        raise UserError("is required", field=f"{prefix}{key}", file=self.file)

    def string(self, d: dict, key: str, prefix: str = "", default: Any = _MISSING) -> str:
        val = self._get(d, key, prefix, default)
        if not isinstance(val, str) or not val:
            raise UserError(f"must be a non-empty string, got {val!r}", field=f"{prefix}{key}", file=self.file)
        return val

    def integer(self, d: dict, key: str, *, minimum: int, prefix: str = "", default: Any = _MISSING) -> Any:
        val = self._get(d, key, prefix, default)
        if val is default and default is not _MISSING:
            return val
        if isinstance(val, float) and val.is_integer():
            val = int(val)
        if isinstance(val, bool) or not isinstance(val, int) or val < minimum:
            raise UserError(f"must be an integer >= {minimum}, got {val!r}", field=f"{prefix}{key}", file=self.file)
        return val

    def number(self, d: dict, key: str, prefix: str = "", default: Any = _MISSING) -> Any:
        val = self._get(d, key, prefix, default)
        if val is default and default is not _MISSING:
            return val
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
            raise UserError(f"must be a number, got {val!r}", field=f"{prefix}{key}", file=self.file)
        return float(val)

    def positive(self, d: dict, key: str, prefix: str = "", default: Any = _MISSING) -> Any:
        val = self.number(d, key, prefix, default)
        if val is default and default is not _MISSING:
            return val
        if val <= 0:
            raise UserError(f"must be > 0, got {val!r}", field=f"{prefix}{key}", file=self.file)
        return val

    def choice(self, d: dict, key: str, options: tuple[str, ...], prefix: str = "", default: Any = _MISSING) -> str:
        val = self._get(d, key, prefix, default)
        if val not in options:
            raise UserError(f"must be one of {', '.join(options)}, got {val!r}", field=f"{prefix}{key}", file=self.file)
        return val
