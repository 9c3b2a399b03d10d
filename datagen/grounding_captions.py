"""BLIP3-GROUNDING caption templates: one object in three formats, two caption shapes.

Formats (docs/captions.md, from the blip3-grounding-50m card), for an object `garment` with box
[0.512, 0.604][0.990, 0.998]:

    positional  garment (at the bottom right corner)
    textual     garment (starts at [0.512, 0.604] and extends up to [0.990, 0.998])
    bbox        <object>garment</object><bbox>[0.512, 0.604][0.990, 0.998]</bbox>

Shapes: a tag list (`The image contains garment (...), neckband (...)`) and the source caption
with grounding inserted after the phrase it grounds (`a football player (in the center) in ...`).

Everything here is a pure function of the stored objects and the source caption, so
`blip3 retemplate` can rebuild captions from shards without re-detecting.

Decisions written down here because the sources are silent:

- Coordinates are 3-decimal numbers in [0, 1]. The 3x3 grid cell of a box is the cell of its
  centre, cells being [0, 1/3), [1/3, 2/3), [2/3, 1]; the test is done on integer thousandths
  (centre*2000 = X1+X2), so it is exact: a centre of 0.333 is in the first cell, 0.3335 in the
  second, 0.6665 in the second, 0.667 in the third.
- Tag list, by default the paper's form (Fig. 4): `<lead-in> a, b, c`, objects in the order the
  detector gave them, no final period. `order="reading"` gives `<lead-in> a, b, c.` in reading
  order instead: by the grid row of the box centre (top to bottom), then left to right by centre x.
- No objects (the policy OCR has for "no text"): the tag variants say so, `<lead-in> no objects`
  ("The image contains no objects", with the period of `order="reading"`), and the inline variants
  are the source caption unchanged, so `.txt` is never empty; `--drop-empty` records such images
  as failed `no_objects` instead.
- Inline insertion, one rule set for all formats:
  * a label matches a whole-word, case-insensitive occurrence of itself in the caption, optionally
    followed by a plural `s`/`es` (`dog` grounds `dogs`); the match keeps the caption's casing;
  * longer labels are placed first and claim their span; a label never matches inside a span
    already claimed (so `player` does not match inside `football player`), and looks for its next
    free occurrence instead;
  * all objects sharing a label go after the label's FIRST free occurrence, joined with `; `
    (positional/textual) or as consecutive `<bbox>` groups (bbox format); later repeats of the
    phrase stay untouched (`a dog ... the dog` usually names one dog twice);
  * objects whose label is not found are appended as a trailing sentence
    (`<also lead-in> x (...).`), so no detected object is lost from the caption.
  * in the bbox format the grounded phrase itself is wrapped: `<object>phrase</object><bbox>...`.
- Labels and the source caption are data: they go through `caption_text` (`<`/`>` become `‹`/`›`,
  one line), so a category named `</object><bbox>...` cannot forge a box; an empty label is
  refused (`EmptyLabel`), never written as `<object></object>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from blip3.core.errors import UserError
from blip3.datagen.caption_text import caption_label, caption_text

FORMATS = ("positional", "textual", "bbox")
STYLES = ("tags", "inline")
ORDERS = ("detector", "reading")  # tag-list object order: the paper's, or ours sorted by position

#: 3x3 grid words, by (row, column) of the box centre.
GRID_WORDS = (
    ("at the top left corner", "above the center", "at the top right corner"),
    ("to the left of the center", "in the center", "to the right of the center"),
    ("at the bottom left corner", "below the center", "at the bottom right corner"),
)

DEFAULT_LEAD_IN = "The image contains"
DEFAULT_ALSO_LEAD_IN = "The image also contains"


@dataclass(frozen=True)
class GroundedObject:
    """One detected or annotated object: label, normalized [x1, y1, x2, y2] box, score."""

    label: str
    bbox: tuple[float, float, float, float]
    score: float = 1.0

    def to_dict(self) -> dict:
        return {"label": self.label, "bbox": list(self.bbox), "score": round(float(self.score), 4)}

    @classmethod
    def from_dict(cls, d: dict) -> "GroundedObject":
        x1, y1, x2, y2 = (float(v) for v in d["bbox"])
        return cls(str(d["label"]), (x1, y1, x2, y2), float(d.get("score", 1.0)))


def normalize_box(
    x1: float, y1: float, x2: float, y2: float, width: float, height: float
) -> tuple[float, float, float, float]:
    """Pixel corners -> [0, 1] corners, clamped, ordered, rounded to 3 decimals."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")

    def clamp(v: float) -> float:
        return round(min(max(v, 0.0), 1.0), 3)

    nx1, nx2 = sorted((clamp(x1 / width), clamp(x2 / width)))
    ny1, ny2 = sorted((clamp(y1 / height), clamp(y2 / height)))
    return nx1, ny1, nx2, ny2


def _thousandths(v: float) -> int:
    return int(round(v * 1000))


def _cell(a: float, b: float) -> int:
    """Grid index 0/1/2 of the centre of [a, b], exactly, on 3-decimal coordinates."""
    twice_centre = _thousandths(a) + _thousandths(b)  # centre * 2000
    if 3 * twice_centre < 2000:
        return 0
    if 3 * twice_centre < 4000:
        return 1
    return 2


def position_words(bbox: Sequence[float]) -> str:
    """Grid words of the box centre: `at the top left corner` ... `at the bottom right corner`."""
    x1, y1, x2, y2 = bbox
    return GRID_WORDS[_cell(y1, y2)][_cell(x1, x2)]


def _coords(bbox: Sequence[float]) -> tuple[str, str]:
    x1, y1, x2, y2 = bbox
    return f"[{x1:.3f}, {y1:.3f}]", f"[{x2:.3f}, {y2:.3f}]"


def location_text(bbox: Sequence[float], fmt: str) -> str:
    """The part that goes in parentheses (positional, textual) or the `<bbox>` group (bbox)."""
    if fmt == "positional":
        return position_words(bbox)
    start, end = _coords(bbox)
    if fmt == "textual":
        return f"starts at {start} and extends up to {end}"
    if fmt == "bbox":
        return f"<bbox>{start}{end}</bbox>"
    raise ValueError(f"unknown grounding format {fmt!r}; expected one of {FORMATS}")


def ground_phrase(phrase: str, boxes: Sequence[Sequence[float]], fmt: str) -> str:
    """`phrase` grounded to one or more boxes in format `fmt`; the phrase is data, so it is escaped
    (`caption_text`) and an empty one is refused (`EmptyLabel`) rather than written as `<object></object>`."""
    phrase = caption_label(phrase)
    if fmt == "bbox":
        return f"<object>{phrase}</object>" + "".join(location_text(b, fmt) for b in boxes)
    return f"{phrase} (" + "; ".join(location_text(b, fmt) for b in boxes) + ")"


def format_object(obj: GroundedObject, fmt: str) -> str:
    """One object as docs/captions.md's table writes it."""
    return ground_phrase(obj.label, [obj.bbox], fmt)


def reading_order(objects: Iterable[GroundedObject]) -> list[GroundedObject]:
    """Grid rows top to bottom, left to right within a row, by box centre (ties: y, label, score)."""

    def key(o: GroundedObject) -> tuple:
        x1, y1, x2, y2 = o.bbox
        cx, cy = _thousandths(x1) + _thousandths(x2), _thousandths(y1) + _thousandths(y2)
        return (_cell(y1, y2), cx, cy, o.label, -o.score)

    return sorted(objects, key=key)


def tag_caption(
    objects: Sequence[GroundedObject], fmt: str, lead_in: str = DEFAULT_LEAD_IN, order: str = "detector"
) -> str:
    """`The image contains a (...), b (...)` in the given order (the paper's form), or with
    order="reading" sorted by position and ended by a period; empty string for no objects."""
    if order not in ORDERS:
        raise ValueError(f"unknown tag order {order!r}; expected one of {ORDERS}")
    if not objects:
        return ""
    reading = order == "reading"
    parts = ", ".join(format_object(o, fmt) for o in (reading_order(objects) if reading else objects))
    end = "." if reading else ""
    return f"{lead_in} {parts}{end}" if lead_in else f"{parts}{end}"


def no_objects_caption(lead_in: str = DEFAULT_LEAD_IN, order: str = "detector") -> str:
    """The tag caption of an image where nothing was found: `The image contains no objects`
    (ended by a period with order="reading", as `tag_caption`)."""
    end = "." if order == "reading" else ""
    return f"{lead_in} no objects{end}" if lead_in else f"No objects{end}"


def _label_pattern(label: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in label.split()]
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?:es|s)?(?!\w)", re.IGNORECASE)


def _find_free(pattern: re.Pattern[str], text: str, taken: list[tuple[int, int]]) -> tuple[int, int] | None:
    for m in pattern.finditer(text):
        s, e = m.span()
        if all(e <= ts or s >= te for ts, te in taken):
            return s, e
    return None


def inline_caption(
    caption: str,
    objects: Sequence[GroundedObject],
    fmt: str,
    also_lead_in: str = DEFAULT_ALSO_LEAD_IN,
) -> str:
    """The source caption with each object's grounding inserted after its phrase (see module doc)."""
    caption = caption_text(caption)  # the same escaping as the labels, so they still match
    by_label: dict[str, list[GroundedObject]] = {}
    for o in reading_order(objects):
        by_label.setdefault(caption_text(o.label).lower(), []).append(o)
    # Longest label first; ties keep first-seen order (dicts are ordered, sort is stable).
    labels = sorted(by_label, key=lambda lab: -len(lab))
    placed: list[tuple[int, int, str]] = []
    missing: list[GroundedObject] = []
    for label in labels:
        span = _find_free(_label_pattern(label), caption, [(s, e) for s, e, _ in placed]) if label else None
        if span is None:
            missing.extend(by_label[label])
            continue
        s, e = span
        placed.append((s, e, ground_phrase(caption[s:e], [o.bbox for o in by_label[label]], fmt)))
    out = caption
    for s, e, grounded in sorted(placed, reverse=True):
        out = out[:s] + grounded + out[e:]
    if missing:
        tail = tag_caption(missing, fmt, also_lead_in, order="reading")  # a sentence closing the caption
        out = out.rstrip()
        sep = "" if not out else (" " if out[-1] in ".!?" else ". ")
        out = f"{out}{sep}{tail}"
    return out


def build_captions(
    objects: Sequence[GroundedObject],
    source_caption: str | None,
    *,
    lead_in: str = DEFAULT_LEAD_IN,
    also_lead_in: str = DEFAULT_ALSO_LEAD_IN,
    tag_order: str = "detector",
) -> list[dict]:
    """All caption variants of a sample: 3 formats x (tags, and inline when a caption exists).

    No objects -> the tag variants say `<lead-in> no objects.` (see the module docstring).
    """
    tags = [tag_caption(objects, f, lead_in, tag_order) if objects else no_objects_caption(lead_in, tag_order)
            for f in FORMATS]
    caps = [{"text": text, "format": f, "style": "tags"} for f, text in zip(FORMATS, tags)]
    if source_caption and source_caption.strip():
        caps += [
            {"text": inline_caption(source_caption.strip(), objects, f, also_lead_in), "format": f, "style": "inline"}
            for f in FORMATS
        ]
    return caps


_NUM = r"(\d+(?:\.\d+)?)"
#: One textual-format object. The released blip3-grounding-50m writes "extends upto"; our
#: template (and the card) "extends up to": both are read.
_TEXTUAL = re.compile(rf"\(starts at \[{_NUM}, {_NUM}\] and extends up ?to \[{_NUM}, {_NUM}\]\)")


def parse_textual_tags(text: str, lead_in: str = DEFAULT_LEAD_IN) -> list[GroundedObject]:
    """Objects read back from a textual-format tag list (`<lead-in> a (starts at [..] and extends
    up to [..]), b (...)`), in caption order; labels are the words between one object and the next.
    A label containing parentheses or commas cannot be told apart from the template and is cut."""
    out: list[GroundedObject] = []
    pos = 0
    for m in _TEXTUAL.finditer(text):
        label = text[pos : m.start()].strip()
        if not out and lead_in and label.startswith(lead_in):
            label = label[len(lead_in) :]
        label = label.lstrip(",;. ").removeprefix("and ").strip()
        x1, y1, x2, y2 = (float(m.group(i)) for i in range(1, 5))
        if label:
            out.append(GroundedObject(label, (x1, y1, x2, y2)))
        pos = m.end()
    return out


def check_caption_choice(caption_format: str, caption_style: str | None, tag_order: str = "detector") -> None:
    """The user's `--caption-format` / `--caption-style` / `--tag-order` (shared by `blip3 ground`
    and `blip3 retemplate`)."""
    if tag_order not in ORDERS:
        raise UserError(f"expected one of {', '.join(ORDERS)}", field="--tag-order")
    if caption_format not in FORMATS:
        raise UserError(f"expected one of {', '.join(FORMATS)}", field="--caption-format")
    if caption_style is not None and caption_style not in STYLES:
        raise UserError(f"expected one of {', '.join(STYLES)}", field="--caption-style")


def pick_caption(captions: Sequence[dict], fmt: str, style: str | None) -> dict | None:
    """The variant stored as `.txt`: `style` (None = inline) falling back to tags when absent."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown grounding format {fmt!r}; expected one of {FORMATS}")
    order = [style or "inline", "tags"]
    for st in order:
        for c in captions:
            if c["format"] == fmt and c["style"] == st:
                return c
    return None
