"""Which stored caption variant a mixture source trains on.

Caption shards keep every variant in their json (`captions`: OCR's 6 granularities x with/without
the source caption, grounding's 3 formats x tags/inline) and one default as `.txt`. The `.txt` is
what other consumers read, so it stays; a mixture spec may instead pick, per source, the variant
the loader hands out:

    sources:
      - {name: blip3-ocr, weight: 5, caption: {granularity: 0, include_datacomp_raw_cap: false, strip_filler: true}}

Every field but `strip_filler` must equal the variant's own field; exactly one variant must match.
`strip_filler` removes the OCR filler ("the text", or the filler recorded in the shard's
generator) before each quoted entry, as the paper's dataloader does: `The image contains the
text "MACK SHOP"` -> `The image contains "MACK SHOP"`.
"""

from __future__ import annotations

from typing import Any

from blip3.core.errors import UserError

#: Fields a choice may match on, and the values each takes.
MATCH_FIELDS: dict[str, tuple[Any, ...]] = {
    "granularity": (0, 1, 2, 3, 4, 5),
    "include_datacomp_raw_cap": (False, True),
    "format": ("positional", "textual", "bbox"),
    "style": ("tags", "inline", "dense", "knowledge"),  # grounding's two; recaptioning's two
}
DEFAULT_FILLER = "the text"


def validate_caption_choice(choice: Any, *, field: str, file: str | None = None) -> dict[str, Any]:
    """The spec's `caption:` mapping, checked (one clear error naming the field)."""
    if not isinstance(choice, dict) or not choice:
        raise UserError("must be a mapping of caption fields, e.g. {granularity: 0, strip_filler: true}",
                        field=field, file=file)
    for key, value in choice.items():
        if key == "strip_filler":
            if not isinstance(value, bool):
                raise UserError(f"must be true or false, got {value!r}", field=f"{field}.{key}", file=file)
            continue
        options = MATCH_FIELDS.get(key)
        if options is None:
            raise UserError(f"unknown caption field (known: {', '.join([*MATCH_FIELDS, 'strip_filler'])})",
                            field=f"{field}.{key}", file=file)
        if value not in options or isinstance(value, bool) != isinstance(options[0], bool):
            raise UserError(f"must be one of {', '.join(map(str, options))}, got {value!r}",
                            field=f"{field}.{key}", file=file)
    if not set(choice) - {"strip_filler"}:
        raise UserError("names no caption field to match", field=field, file=file)
    return dict(choice)


def strip_filler(text: str, filler: str = DEFAULT_FILLER) -> str:
    """`the text "A", the text "B"` -> `"A", "B"` (only where the filler precedes a quoted entry)."""
    return text.replace(f'{filler} "', '"') if filler else text


def chosen_caption(record: dict[str, Any], choice: dict[str, Any], *, key: str, shard: str | None = None) -> str:
    """The caption text `choice` selects from a sample's json record."""
    variants = record.get("captions") or []
    want = {k: v for k, v in choice.items() if k != "strip_filler"}
    hits = [c for c in variants if isinstance(c, dict) and all(k in c and c[k] == v for k, v in want.items())]
    if len(hits) != 1:
        raise UserError(
            f"sample {key}: {len(hits)} caption variants match {want} (it has {len(variants)})", field="caption", file=shard
        )
    text = str(hits[0]["text"])
    if choice.get("strip_filler"):
        filler = ((record.get("generator") or {}).get("filler")) or DEFAULT_FILLER
        text = strip_filler(text, filler)
    return text


def apply_caption_choice(sample: dict[str, Any], choice: dict[str, Any] | None) -> dict[str, Any]:
    """The loader's sample with `txt` replaced by the chosen variant (unchanged without a choice)."""
    if not choice:
        return sample
    return {**sample, "txt": chosen_caption(sample.get("json") or {}, choice, key=sample["key"], shard=sample.get("shard"))}
