"""The one rule for text that comes from data and lands in a tagged caption.

OCR'd text, object labels and categories, and source captions (alt text) are data: a category named
`</object><bbox>[0,0][1,1]</bbox>` or an alt text holding `</ocr>` must not forge tags in training
captions, where `<ocr>`, `<object>` and `<bbox>` spans are what the model learns to read and write.

Rule (applied by `ocr_captions` and `grounding_captions`, so `blip3 retemplate` follows it too):

- whitespace runs (newlines, tabs) become one space, and other control characters are dropped:
  a caption is one line;
- `<` and `>` become `‹` and `›` (U+2039, U+203A): no text from data can open or close a tag,
  whichever tags a template uses now or later, and the text still reads the same to a person;
- a label that is empty after this is refused (`EmptyLabel`), never written as `<object></object>`:
  annotation files are refused at load, a detector's empty label fails its sample with a reason.

Stored metadata (OCR entries, objects) keeps the text as found; only captions are escaped, so a
later template can choose again.
"""

from __future__ import annotations

import unicodedata

_BRACKETS = str.maketrans({"<": "\u2039", ">": "\u203a"})


class EmptyLabel(ValueError):
    """An object label with nothing left to write."""


def caption_text(text: str | None) -> str:
    """`text` made safe to place inside a tagged caption (see the module's rule)."""
    if not text:
        return ""
    kept = "".join(" " if ch.isspace() else ch for ch in text if ch.isspace() or unicodedata.category(ch) != "Cc")
    return " ".join(kept.split()).translate(_BRACKETS)


def caption_label(label: str | None) -> str:
    """An object label for a caption; raises EmptyLabel when nothing is left of it."""
    text = caption_text(label)
    if not text:
        raise EmptyLabel(f"object label {label!r} is empty; an object needs a name to be grounded")
    return text
