"""BLIP3-OCR caption templates: 6 granularities x with/without the source caption = 12 variants.

One entry `{"text": "MACK SHOP", "bbox": [0.192, 0.037, 0.817, 0.203]}` reads (docs/captions.md, the
paper's own example, a golden test):

    0  "MACK SHOP"
    1  "MACK SHOP" located above the center
    2  "MACK SHOP" located at 2/17 of the image from top to bottom and 1/2 of the image from left to right
    3  "MACK SHOP" approximately starts at [0.2, 0.0] and extends up to [0.8, 0.2]
    4  "MACK SHOP" starts at [0.192, 0.037] and extends up to [0.817, 0.203]
    5  <ocr>MACK SHOP</ocr><bbox>[0.192, 0.037][0.817, 0.203]</bbox>

A caption is one sentence: `{lead_in} {entry}, {entry}, ... .` where each entry at granularities
0-4 is preceded by the filler (`the text "MACK SHOP" located ...`). Lead-in (default
`The image contains`) and filler (default `the text`; the paper strips it in the dataloader, so
`filler=""` gives `The image contains "MACK SHOP" ...`) are configurable. Granularity 5 entries are
token spans and carry no filler. Granularity 2 uses `Fraction(c).limit_denominator(20)` of the box
centre (y, then x); a whole fraction prints as `0` or `1`.

Text from data (the OCR'd text, the source caption) goes through `caption_text.caption_text`
first: `<`/`>` become `‹`/`›`, so an alt text holding `</ocr>` cannot forge a tag.

With `include_datacomp_raw_cap=True` the source caption (alt text) leads: `{source}. {sentence}`
(a final `.`, `!` or `?` of the source is kept instead of adding one). Without a source caption
the variant is the same text as the one without it, so every image has all 12 variants.

Images without text (no entry left after the confidence filter): KEPT as valid samples with
`metadata.entries = []`; their OCR sentence is `{lead_in} no text.` ("The image contains no
text."), led by the source caption in the `include_datacomp_raw_cap` variants. Users who want
them gone filter on `n_ocr = 0` in the catalog, or run with `keep_empty=False` (the sample is then
recorded as failed with reason `no_text`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from blip3.datagen.caption_text import caption_text

GRANULARITIES = (0, 1, 2, 3, 4, 5)
_GRID = (
    ("at the top left", "above the center", "at the top right"),
    ("to the left of the center", "in the center", "to the right of the center"),
    ("at the bottom left", "below the center", "at the bottom right"),
)


@dataclass(frozen=True)
class CaptionStyle:
    """The configurable words around the entries."""

    lead_in: str = "The image contains"
    filler: str = "the text"
    no_text: str = "no text"


def _grid_cell(v: float) -> int:
    return 0 if v < 1 / 3 else (1 if v < 2 / 3 else 2)


def _fraction(v: float) -> str:
    return str(Fraction(v).limit_denominator(20))


def format_entry(text: str, bbox: list[float], granularity: int) -> str:
    """One entry at one granularity, exactly as docs/captions.md's table."""
    x1, y1, x2, y2 = bbox
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    text = caption_text(text)  # OCR'd text is data: it cannot open or close a tag
    quoted = f'"{text}"'
    if granularity == 0:
        return quoted
    if granularity == 1:
        return f"{quoted} located {_GRID[_grid_cell(cy)][_grid_cell(cx)]}"
    if granularity == 2:
        return (f"{quoted} located at {_fraction(cy)} of the image from top to bottom "
                f"and {_fraction(cx)} of the image from left to right")
    if granularity == 3:
        return f"{quoted} approximately starts at [{x1:.1f}, {y1:.1f}] and extends up to [{x2:.1f}, {y2:.1f}]"
    if granularity == 4:
        return f"{quoted} starts at [{x1:.3f}, {y1:.3f}] and extends up to [{x2:.3f}, {y2:.3f}]"
    if granularity == 5:
        return f"<ocr>{text}</ocr><bbox>[{x1:.3f}, {y1:.3f}][{x2:.3f}, {y2:.3f}]</bbox>"
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def ocr_sentence(entries: list[dict[str, Any]], granularity: int, style: CaptionStyle = CaptionStyle()) -> str:
    """All entries of an image at one granularity, as one sentence (or the no-text sentence)."""
    if not entries:
        return f"{style.lead_in} {style.no_text}."
    parts = []
    for e in entries:
        body = format_entry(e["text"], e["bbox"], granularity)
        parts.append(f"{style.filler} {body}" if style.filler and granularity != 5 else body)
    return f"{style.lead_in} {', '.join(parts)}."


def with_source(source: str | None, sentence: str) -> str:
    """Lead the OCR sentence with the source caption (alt text), when there is one."""
    src = caption_text(source)
    if not src:
        return sentence
    return f"{src if src[-1] in '.!?' else src + '.'} {sentence}"


def build_captions(
    entries: list[dict[str, Any]], source_caption: str | None, style: CaptionStyle = CaptionStyle()
) -> list[dict[str, Any]]:
    """The 12 variants in the public dataset's shape: `{"text", "granularity", "include_datacomp_raw_cap"}`."""
    sentences = {g: ocr_sentence(entries, g, style) for g in GRANULARITIES}
    return [{"text": with_source(source_caption, sentences[g]) if raw else sentences[g],
             "granularity": g, "include_datacomp_raw_cap": raw}
            for raw in (False, True) for g in GRANULARITIES]


# -- parsing back (tests, re-templating) ------------------------------------------------------
_NUM = r"(-?\d+(?:\.\d+)?)"
_BOX_PATTERNS = {
    3: re.compile(rf'"(.*?)" approximately starts at \[{_NUM}, {_NUM}\] and extends up to \[{_NUM}, {_NUM}\]'),
    4: re.compile(rf'"(.*?)" starts at \[{_NUM}, {_NUM}\] and extends up to \[{_NUM}, {_NUM}\]'),
    5: re.compile(rf"<ocr>(.*?)</ocr><bbox>\[{_NUM}, {_NUM}\]\[{_NUM}, {_NUM}\]</bbox>"),
}


def parse_sentence(sentence: str, granularity: int) -> list[tuple[str, list[float]]]:
    """Entries `(text, bbox)` read back from a sentence at granularity 3, 4 or 5.

    Texts containing the template's own delimiters (`"` or `</ocr>`) cannot be read back
    unambiguously; everything else round-trips.
    """
    pattern = _BOX_PATTERNS.get(granularity)
    if pattern is None:
        raise ValueError(f"granularity {granularity} carries no box")
    return [(m.group(1), [float(m.group(i)) for i in range(2, 6)]) for m in pattern.finditer(sentence)]
