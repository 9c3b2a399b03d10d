"""The one rule for text that comes from data and lands in a tagged caption.

OCR'd text, object labels and categories, and source captions (alt text) are data: a category named
`</object><bbox>[0,0][1,1]</bbox>` or an alt text holding `</ocr>` must not forge tags in training
captions, where `<ocr>`, `<object>` and `<bbox>` spans are what the model learns to read and write.

Rule (applied by `ocr_captions` and `grounding_captions`, so `blip3 retemplate` follows it too):

- whitespace runs (newlines, tabs) become one space, and other control characters are dropped
  (`strip_controls`: C0/C1 controls such as NUL and ESC, whole terminal escape sequences, lone
  surrogates, bidirectional overrides): a caption is one line of printable text;
- `<` and `>` become `‹` and `›` (U+2039, U+203A): no text from data can open or close a tag,
  whichever tags a template uses now or later, and the text still reads the same to a person;
- a label that is empty after this is refused (`EmptyLabel`), never written as `<object></object>`:
  annotation files are refused at load, a detector's empty label fails its sample with a reason.

Stored metadata (OCR entries, objects) keeps the text as found; only captions are escaped, so a
later template can choose again.
"""

from __future__ import annotations

import re
import unicodedata

#: Terminal escape sequences (colours, cursor moves): dropped whole, not just their ESC.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]")
#: Bidirectional embeddings, overrides and isolates: they reorder how text is shown ("Trojan Source").
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_KEPT_WITH_NEWLINES = frozenset("\n\t")
_BRACKETS = str.maketrans({"<": "\u2039", ">": "\u203a"})


class EmptyLabel(ValueError):
    """An object label with nothing left to write."""


def strip_controls(text: str, *, keep_newlines: bool = False) -> str:
    """`text` without control characters: terminal escape sequences are dropped whole, other C0/C1
    controls (NUL, ESC, DEL, ...), lone surrogates (not encodable) and bidirectional overrides
    are dropped; whitespace controls become a space, except newlines and tabs with
    `keep_newlines` (multi-line text such as chat turns)."""
    text = _ANSI.sub("", text)
    out = []
    for ch in text:
        if keep_newlines and ch in _KEPT_WITH_NEWLINES:
            out.append(ch)
        elif keep_newlines and ch == "\r":  # CRLF reads as LF
            continue
        elif ch.isspace():
            out.append(" " if unicodedata.category(ch) == "Cc" else ch)
        elif unicodedata.category(ch) not in ("Cc", "Cs") and ch not in _BIDI:
            out.append(ch)
    return "".join(out)


def caption_text(text: str | None) -> str:
    """`text` made safe to place inside a tagged caption (see the module's rule)."""
    if not text:
        return ""
    return " ".join(strip_controls(text).split()).translate(_BRACKETS)


def caption_label(label: str | None) -> str:
    """An object label for a caption; raises EmptyLabel when nothing is left of it."""
    text = caption_text(label)
    if not text:
        raise EmptyLabel(f"object label {label!r} is empty; an object needs a name to be grounded")
    return text
